"""DNABERT-S (Zhou et al. 2024), a DNABERT-2 / MosaicBERT encoder, for embedding packed DNA sequences.

A native implementation that loads the published files (`config.json`, `pytorch_model.bin` or
`model.safetensors`, `tokenizer.json`) without `trust_remote_code`, whose Triton kernel no longer
runs on current Triton and whose PyTorch fallback fails in half precision.

Architecture: word + token-type embeddings and LayerNorm (no position embeddings); post-LN layers of
ALiBi self-attention (fused Wqkv) and a gated-GELU MLP. Module names follow the checkpoint's keys so
the state dict loads as is. Sequences are packed; attention (`virnucpro.kernels.attention.select_backend`) on
a CUDA GPU is varlen FlashAttention-2 with its own ALiBi slopes where torch's build has them (none so
far), else our packed kernel in Triton with the bias (`virnucpro.kernels.triton_attention`), each checked at load against
the bias added by hand; else SDPA over a padded grid with the ALiBi bias added (CPU, float32, no
Triton, `--attention sdpa`), or FlexAttention's packed ALiBi kernel when asked for (`--attention flex`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from virnucpro.kernels.attention import Backend, Packing, alibi_slopes, attention, in_background, select_backend
from virnucpro.errors import CheckpointError
from virnucpro.models.tokenizers import DNABERTSTokenizer  # noqa: F401 - also imported from here
from virnucpro.models.loading import check_state_dict, load_error, load_weights_only, on_meta_device, to_device

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class DNABERTSConfig:
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    vocab_size: int = 4096
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_json(cls, path: Path) -> "DNABERTSConfig":
        raw = json.loads(path.read_text())
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


class BertEmbeddings(nn.Module):
    def __init__(self, c: DNABERTSConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # every token has token type 0
        return self.LayerNorm(self.word_embeddings(tokens) + self.token_type_embeddings.weight[0])


class BertSelfAttention(nn.Module):
    def __init__(self, c: DNABERTSConfig):
        super().__init__()
        self.num_heads = c.num_attention_heads
        self.head_dim = c.hidden_size // c.num_attention_heads
        self.Wqkv = nn.Linear(c.hidden_size, 3 * c.hidden_size)


class BertSelfOutput(nn.Module):
    def __init__(self, c: DNABERTSConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


class BertAttention(nn.Module):
    def __init__(self, c: DNABERTSConfig):
        super().__init__()
        self.self = BertSelfAttention(c)
        self.output = BertSelfOutput(c)

    def forward(self, x: torch.Tensor, packing: Packing, backend: Backend, slopes: torch.Tensor,
                fused: bool = False) -> torch.Tensor:
        T, C = x.shape
        s = self.self
        q, k, v = s.Wqkv(x).view(T, 3, s.num_heads, s.head_dim).unbind(1)  # [T, H, hd] each
        y = self.output.dense(attention(q, k, v, packing, backend, scale=s.head_dim ** -0.5, alibi=slopes).reshape(T, C))
        if fused:
            from virnucpro.kernels.triton_elementwise import add_layer_norm
            return add_layer_norm(y, x, self.output.LayerNorm)
        return self.output.LayerNorm(x + y)  # post-LN


class BertGatedLinearUnitMLP(nn.Module):
    def __init__(self, c: DNABERTSConfig):
        super().__init__()
        self.intermediate_size = c.intermediate_size
        self.gated_layers = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=False)
        self.wo = nn.Linear(c.intermediate_size, c.hidden_size)
        self.layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        h = self.gated_layers(x)  # [T, 2I]: the gate, then the linear half
        if fused:
            from virnucpro.kernels.triton_elementwise import add_layer_norm, gated_gelu
            return add_layer_norm(self.wo(gated_gelu(h)), x, self.layernorm)
        gated, linear = h.split(self.intermediate_size, dim=-1)
        return self.layernorm(x + self.wo(F.gelu(gated) * linear))  # post-LN


class BertLayer(nn.Module):
    def __init__(self, c: DNABERTSConfig):
        super().__init__()
        self.attention = BertAttention(c)
        self.mlp = BertGatedLinearUnitMLP(c)

    def forward(self, x: torch.Tensor, packing: Packing, backend: Backend, slopes: torch.Tensor,
                fused: bool = False) -> torch.Tensor:
        """`fused`: the elementwise steps in our Triton kernels (`virnucpro.kernels.triton_elementwise`), for
        layers that run uncompiled; compiled layers leave them to Inductor, which fuses the same steps."""
        return self.mlp(self.attention(x, packing, backend, slopes, fused), fused)


class BertEncoder(nn.Module):
    def __init__(self, c: DNABERTSConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(c) for _ in range(c.num_hidden_layers))


class DNABERTS(nn.Module):
    family = "dnabert_s"
    bos_name = "cls"  # the [CLS] token's output column: cls_<L>
    specials = (0, 0)  # DNABERT-S means every token, [CLS] and [SEP] included; so do its per-token outputs

    def __init__(self, config: DNABERTSConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        # float32 whatever the model dtype, and not a buffer so that .to(dtype) leaves it alone
        self.alibi_slopes = torch.tensor(alibi_slopes(config.num_attention_heads), dtype=torch.float32,
                                         device="cpu")
        self.backend = Backend("sdpa", "not selected yet")
        self.fused = False  # uncompiled layers' elementwise steps in Triton (set at load: fused_kernels_fail)

    @property
    def dim(self) -> int:
        return self.config.hidden_size

    @property
    def num_layers(self) -> int:
        return len(self.encoder.layer)

    def forward(self, tokens: torch.Tensor, packing: Packing, layers: list[nn.Module] | None = None) -> torch.Tensor:
        """tokens: int [T] packed ids -> last layer hidden states [T, D]. `layers`: run these in place of
        the encoder's (their compiled versions, `compiled_layers()`)."""
        return self.hidden_states(tokens, packing, (self.num_layers,), layers)[self.num_layers]

    def hidden_states(self, tokens: torch.Tensor, packing: Packing, keep: tuple[int, ...],
                      layers: list[nn.Module] | None = None) -> dict[int, torch.Tensor]:
        """The hidden states [T, D] after each layer in `keep` (0: the embedding output, after its layer
        norm); layers past the deepest one kept are not run."""
        x = self.embeddings(tokens)
        slopes = self.alibi_slopes.to(tokens.device)
        out = {0: x} if 0 in keep else {}
        fused = self.fused and layers is None  # compiled layers: Inductor fuses these steps itself
        layers = list(self.encoder.layer if layers is None else layers)[:max(keep)]
        for i, layer in enumerate(layers, 1):
            x = layer(x, packing, self.backend, slopes, fused)
            if i in keep:
                out[i] = x
        return out

    @property
    def compile_pays(self) -> bool:
        """Whether compiling the layers pays on a GPU. Not with the fused elementwise kernels: the
        uncompiled layers then run about as fast as the compiled ones, and an actor spares the compiler's
        import, which slows its first batches (bench/README.md, "End to end")."""
        return not self.fused

    def compiled_layers(self) -> list[nn.Module]:
        """Each layer under torch.compile for dynamic token counts, sharing its weights (fuses the post-LN,
        GELU gate, residuals); nothing compiles until they first run (see ESM2.compiled_layers)."""
        from virnucpro.kernels.compiling import compiled

        return compiled(list(self.encoder.layer))

    def compile_layers(self) -> None:
        """Compile the layers in place (scripts that compile before they run anything). The fused kernels
        are then off: Inductor fuses those steps itself."""
        from virnucpro.kernels.compiling import compile_in_place

        compile_in_place(list(self.encoder.layer))
        self.fused = False

    def embed(self, tokens: torch.Tensor, packing: Packing, layers: list[nn.Module] | None = None) -> torch.Tensor:
        """Mean over all tokens of each sequence, [CLS] and [SEP] included (as DNABERT-S), float32 [B, D]."""
        return packing.mean(self(tokens, packing, layers))


def read_weights(model_dir: Path, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    """The weights by name (safetensors, or a tensors-only `torch.load`); with `shapes_only`, tensors
    on the meta device (names, shapes, dtypes; nothing read into memory)."""
    for name in WEIGHT_FILES:
        path = model_dir / name
        if path.is_file():
            break
    else:
        raise CheckpointError(f"{model_dir}: no {' or '.join(WEIGHT_FILES)}")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file
            if shapes_only:
                with safe_open(str(path), "pt") as f:
                    state = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
            else:
                state = load_file(str(path))
        else:
            state = load_weights_only(path, mmap=shapes_only)
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise CheckpointError(f"{path}: not a state dict of tensors")
            if shapes_only:
                state = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items()}
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any unpickling or format failure is a bad weights file
        raise CheckpointError(f"{path}: not a readable weights file ({load_error(e)})") from None
    # DNABERT-S has no "bert." prefix, DNABERT-2 does; the MLM head and pooler are not used.
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith(("pooler.", "cls."))}


def _config(model_dir: Path) -> DNABERTSConfig:
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{model_dir}: no config.json (not a DNABERT-S model directory)")
    try:
        return DNABERTSConfig.from_json(model_dir / "config.json")
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{model_dir}/config.json: not a readable model config ({e})") from None


def _matched(model_dir: Path, config: DNABERTSConfig, state: dict[str, torch.Tensor]) -> DNABERTS:
    """Our module on the meta device, after checking the weights' names and shapes against it."""
    with on_meta_device():
        model = DNABERTS(config)
    check_state_dict(model.state_dict(), state, model_dir, "DNABERT-S")
    return model


def check_dnabert_s(model_dir: str | Path) -> DNABERTSConfig:
    """Check the weights' names and shapes without loading them (the driver, before actors start)."""
    model_dir = Path(model_dir)
    config = _config(model_dir)
    _matched(model_dir, config, read_weights(model_dir, shapes_only=True))
    return config


def load_dnabert_s(model_dir: str | Path, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32, attention_backend: str = "auto") -> DNABERTS:
    """Load a DNABERT-S directory into our module, on `device` in `dtype`, in eval mode."""
    model_dir = Path(model_dir)
    config = _config(model_dir)
    dev = torch.device(device)
    with in_background(dev, lambda: (  # one after the other: Triton's first launches in one thread
            select_backend(dev, dtype, alibi=True, requested=attention_backend,
                           head_dim=config.hidden_size // config.num_attention_heads),
            fused_kernels_fail(dev, dtype, config.hidden_size, config.intermediate_size))) as checks:
        state = to_device(read_weights(model_dir), device, dtype)
        model = _matched(model_dir, config, state)
        model.load_state_dict(state, assign=True)
        model.alibi_slopes = model.alibi_slopes.to(device)
    model.backend, why = checks.result()
    model.fused = why is None
    log.info("DNABERT-S %d layers x %d dim from %s on %s/%s: %s; elementwise steps: %s", config.num_hidden_layers,
             config.hidden_size, model_dir, device, str(dtype).removeprefix("torch."), model.backend.describe(),
             "fused Triton kernels (uncompiled layers)" if why is None else f"PyTorch's ({why})")
    return model.eval().requires_grad_(False)


@lru_cache(maxsize=None)
def fused_kernels_fail(device: torch.device, dtype: torch.dtype, width: int, intermediate: int) -> str | None:
    """None where our fused elementwise kernels (`virnucpro.kernels.triton_elementwise`) run here and agree with
    PyTorch's ops, computed in float32, on random rows of the model's widths; otherwise why not. Once per
    device, dtype and widths: milliseconds, plus Triton's compile of the two kernels on first use."""
    if device.type != "cuda":
        return f"device is {device.type}, the fused kernels need CUDA"
    if not dtype.is_floating_point:
        return f"dtype {str(dtype).removeprefix('torch.')} is not a float type"
    try:
        from virnucpro.kernels.triton_elementwise import add_layer_norm, gated_gelu
    except ImportError as e:
        return f"no Triton ({e})"
    g = torch.Generator(device=device).manual_seed(0)
    rows = 37  # not a multiple of any tile's rows
    h = torch.randn(rows, 2 * intermediate, device=device, dtype=dtype, generator=g)
    x, r = (torch.randn(rows, width, device=device, dtype=dtype, generator=g) for _ in range(2))
    norm = nn.LayerNorm(width, eps=1e-12, device=device, dtype=dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1, generator=g)
        norm.bias.normal_(0.0, 0.1, generator=g)
    try:
        got_mlp, got_norm = gated_gelu(h), add_layer_norm(x, r, norm)
        torch.cuda.synchronize(device)  # a fault inside a kernel surfaces here, not in the comparison
    except Exception as e:  # noqa: BLE001 - a kernel this build or GPU refuses, whatever it raises
        lines = str(e).strip().splitlines()
        return f"{type(e).__name__}: {lines[0][:120] if lines else ''}"
    hf = h.float()
    want_mlp = F.gelu(hf[:, :intermediate]) * hf[:, intermediate:]
    want_norm = F.layer_norm(x.float() + r.float(), (width,), norm.weight.float(), norm.bias.float(), norm.eps)
    if not torch.allclose(got_mlp.float(), want_mlp, atol=2e-2, rtol=1e-2):
        return "its gated GELU differs from gelu(h[:, :I]) * h[:, I:]"
    if not torch.allclose(got_norm.float(), want_norm, atol=2e-2, rtol=1e-2):
        return "its add + LayerNorm differs from layer_norm(x + r)"
    return None


def load(path: Path, device: torch.device | str, dtype: torch.dtype, attention_backend: str = "auto") -> DNABERTS:
    """The registry's loader (`virnucpro.models.registry.FAMILIES`)."""
    return load_dnabert_s(path, device, dtype, attention_backend)


def describe(model_dir: Path) -> dict:
    """The registry's check: the weights' names and shapes checked without loading them; the width and
    the layers (no LM head: no logits)."""
    config = check_dnabert_s(model_dir)
    return {"dim": config.hidden_size, "layers": config.num_hidden_layers, "logits": False,
            "bos_name": DNABERTS.bos_name}
