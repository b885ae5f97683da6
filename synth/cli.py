"""The ``synth`` command: speak text to a WAV file, or list voices.

    synth say "Welcome to the meeting" out.wav [--voice en-us] [--rate 1.2] [--pitch 0.9] [--ssml]
    synth say - out.wav < prompt.txt
    synth say "Hello" out.wav --engine piper --model en_US-lessac-medium.onnx
    synth voices [--engine espeak|piper --model PATH] [--variants]
    synth detect FILE.wav [--key KEY]      # provenance watermark: JSON verdict, prompt id, windows

Exit codes: 0 success; 2 for a request the caller can fix (empty text, unknown voice, text too long,
option out of range, bad arguments); 1 when the engine itself fails.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from synth.engine import (
    DEFAULT_MAX_CHARS,
    PITCH_RANGE,
    RATE_RANGE,
    InvalidRequest,
    SynthEngine,
    SynthError,
    VoiceOptions,
)

EXIT_ENGINE_FAILURE = 1
EXIT_BAD_REQUEST = 2


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=["espeak", "piper"], default="espeak", help="default: espeak")
    parser.add_argument("--model", type=Path, help="Piper voice model (.onnx, with .onnx.json beside it)")
    parser.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS, help="longest accepted text")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synth", description="Text-to-speech for spoken prompts.")
    commands = parser.add_subparsers(dest="command", required=True)

    say = commands.add_parser("say", help="speak TEXT into a WAV file")
    say.add_argument("text", help='the text to speak ("-" reads standard input)')
    say.add_argument("out", type=Path, help="output WAV path")
    say.add_argument("--voice", help="voice name (see `synth voices`); default: the engine's default")
    say.add_argument(
        "--rate",
        type=float,
        default=1.0,
        help=f"relative speaking rate, 1.0 = normal, 2.0 = twice as fast; range {RATE_RANGE[0]}..{RATE_RANGE[1]}",
    )
    say.add_argument(
        "--pitch",
        type=float,
        default=1.0,
        help=f"relative base pitch, 1.0 = normal; range {PITCH_RANGE[0]}..{PITCH_RANGE[1]} (eSpeak only)",
    )
    say.add_argument("--ssml", action="store_true", help="TEXT is SSML markup (eSpeak only)")
    say.add_argument("--sample-rate", type=int, help="resample the output to this rate (default: engine's)")
    _add_engine_arguments(say)

    voices = commands.add_parser("voices", help="list the voices of an engine")
    voices.add_argument(
        "--variants", action="store_true", help="list eSpeak voice variants (use as LANG+VARIANT)"
    )
    _add_engine_arguments(voices)

    detect = commands.add_parser("detect", help="look for the provenance watermark in a WAV file (JSON out)")
    detect.add_argument("file", type=Path, help="WAV (any rate; stereo is mixed down)")
    detect.add_argument("--key", help="watermark key (default: $SYNTH_WATERMARK_KEY, else the public dev key)")
    return parser


def _detect(args: argparse.Namespace) -> int:
    import json
    import os

    from synth.watermark import DEV_KEY, WatermarkConfig, detect

    if not args.file.is_file():
        raise InvalidRequest(f"no file at {args.file}")
    try:
        audio, rate = sf.read(str(args.file), dtype="float64", always_2d=True)
    except (RuntimeError, sf.LibsndfileError) as exc:
        raise InvalidRequest(f"cannot read {args.file}: {exc}") from exc
    key = args.key or os.environ.get("SYNTH_WATERMARK_KEY") or DEV_KEY
    found = detect(audio.mean(axis=1), int(rate), WatermarkConfig(key=key))
    print(json.dumps({"file": str(args.file), **found.as_dict()}))
    return 0


def make_engine(args: argparse.Namespace) -> SynthEngine:
    if args.engine == "piper":
        if args.model is None:
            raise InvalidRequest("--engine piper needs --model PATH/TO/VOICE.onnx")
        if not args.model.is_file():
            raise InvalidRequest(f"no Piper model at {args.model}")
        from synth.piper import PiperEngine

        return PiperEngine(args.model, max_chars=args.max_chars)
    if args.model is not None:
        raise InvalidRequest("--model is only used with --engine piper")
    from synth.espeak import EspeakEngine

    return EspeakEngine(max_chars=args.max_chars)


def _say(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text
    engine = make_engine(args)
    options = VoiceOptions(voice=args.voice, rate=args.rate, pitch=args.pitch, ssml=args.ssml)
    result = engine.synthesize(text, options)
    audio, rate = result.audio, result.sample_rate
    if args.sample_rate and args.sample_rate != rate:
        from synth.service import resample_to

        audio, rate = resample_to(audio, rate, args.sample_rate), args.sample_rate
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(args.out), np.clip(audio, -1.0, 1.0), rate, subtype="PCM_16")
    print(f"{args.out}: {len(audio) / rate:.2f} s at {rate} Hz, engine {result.engine}, voice {result.voice}")
    return 0


def _voices(args: argparse.Namespace) -> int:
    engine = make_engine(args)
    if args.variants:
        from synth.espeak import EspeakEngine

        if not isinstance(engine, EspeakEngine):
            raise InvalidRequest("--variants applies to the espeak engine only")
        names = engine.variants()
    else:
        names = engine.voices()
    print("\n".join(names))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "detect":
            return _detect(args)
        return _say(args) if args.command == "say" else _voices(args)
    except InvalidRequest as exc:
        print(f"synth: error: {exc}", file=sys.stderr)
        return EXIT_BAD_REQUEST
    except SynthError as exc:
        print(f"synth: engine failure: {exc}", file=sys.stderr)
        return EXIT_ENGINE_FAILURE


if __name__ == "__main__":
    sys.exit(main())
