"""ESM-2 (Lin et al. 2023) for embedding: the function of fair-esm's `ESM2`, over packed sequences.

Differences from fair-esm, none of which change the result:
  * sequences are packed into one token stream (no padding), attention is FlashAttention over the
    packed stream on CUDA (our Triton kernel, or FlashAttention-2's varlen kernel) and padded SDPA
    elsewhere (see `virnucpro.kernels.attention`);
  * q, k and v are one fused projection (one GEMM instead of three);
  * rotary tables are computed once a batch in float32 from each token's position, whatever the model dtype (bf16
    cannot represent positions above 256 exactly);
  * no LM head, no contact head, no attention weights; only the layers up to the requested one run.

Checkpoints are fair-esm `.pt` files ({"model": state dict, "cfg": {"model": Namespace(...)}}) or
Hugging Face ESM-2 directories (config.json with model_type "esm", EsmModel or EsmForMaskedLM weights),
whose names and config are translated to fair-esm's on reading, so that checking and loading are one path.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from virnucpro.kernels.attention import Backend, Packing, attention, in_background, select_backend
from virnucpro.errors import CheckpointError
from virnucpro.models.loading import check_state_dict, load_error, load_weights_only, on_meta_device, to_device
from virnucpro.models.tokenizers import ALPHABET, CLS, EOS, MASK, PAD, UNK, ESM2Tokenizer, check_esm_vocab  # noqa: F401 - also imported from here

log = logging.getLogger(__name__)

# (layers, embed dim, heads) of the published checkpoints, for checkpoints without a readable cfg
KNOWN_SHAPES = {
    "esm2_t6_8M_UR50D": (6, 320, 20),
    "esm2_t12_35M_UR50D": (12, 480, 20),
    "esm2_t30_150M_UR50D": (30, 640, 20),
    "esm2_t33_650M_UR50D": (33, 1280, 20),
    "esm2_t36_3B_UR50D": (36, 2560, 40),
    "esm2_t48_15B_UR50D": (48, 5120, 40),
}


@dataclass(frozen=True)
class ESM2Config:
    num_layers: int
    embed_dim: int
    attention_heads: int
    token_dropout: bool = True
    vocab_size: int = len(ALPHABET)


def rotary_tables(position: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, 1, head_dim/2] in float32 for rotary embeddings (RoFormer), computed once a batch."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=position.device,
                                             dtype=torch.float32) / head_dim))
    freqs = position.float()[:, None] * inv_freq[None, :]
    return freqs.cos()[:, None, :], freqs.sin()[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, hd] in float32, as fair-esm's (x * cos) + (rotate_half(x) * sin)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class MultiheadAttention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.qkv_proj = nn.Linear(embed_dim, 3 * embed_dim)  # q_proj, k_proj, v_proj fused
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor, packing: Packing, backend: Backend, rotary) -> torch.Tensor:
        T, C = x.shape
        q, k, v = self.qkv_proj(x).view(T, 3, self.num_heads, self.head_dim).unbind(1)  # [T, H, hd] each
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        y = attention(q, k, v, packing, backend, scale=self.head_dim ** -0.5)
        return self.out_proj(y.reshape(T, C))


class TransformerLayer(nn.Module):
    """Pre-LayerNorm transformer layer with exact (erf) GELU (in half precision on CUDA, see gelu_epilogue)."""

    def __init__(self, embed_dim: int, ffn_dim: int, num_heads: int):
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(embed_dim)
        self.self_attn = MultiheadAttention(embed_dim, num_heads)
        self.final_layer_norm = nn.LayerNorm(embed_dim)
        self.fc1 = nn.Linear(embed_dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, embed_dim)

    # On CUDA in bf16/fp16, cuBLASLt adds fc1's bias and applies the GELU in the GEMM's epilogue, sparing
    # a pass over the 4d-wide activations (bench/README.md, "Where the time goes"). Its GELU is the tanh
    # form, within half-precision rounding of the exact one (tests/test_gpu.py holds the pooled cosine to
    # float32); float32 keeps the exact GELU.
    gelu_epilogue = True

    def forward(self, x: torch.Tensor, packing: Packing, backend: Backend, rotary) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), packing, backend, rotary)
        return x + self.fc2(self.fc1_gelu(self.final_layer_norm(x)))

    def fc1_gelu(self, x: torch.Tensor) -> torch.Tensor:
        # a plain Linear only: bench_fp8 swaps fc1 for an FP8 GEMM of its own
        if (self.gelu_epilogue and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
                and type(self.fc1) is nn.Linear):
            # the aten op, not torch._addmm_activation: torch 2.11's dynamo breaks the graph at that one
            return torch.ops.aten._addmm_activation(self.fc1.bias, x, self.fc1.weight.t(), use_gelu=True)
        return F.gelu(self.fc1(x))


class LMHead(nn.Module):
    """fair-esm's RobertaLMHead: dense, GELU, LayerNorm, then the token embedding matrix (tied) and a bias."""

    def __init__(self, embed_dim: int, vocab_size: int):
        super().__init__()
        self.dense = nn.Linear(embed_dim, embed_dim)
        self.layer_norm = nn.LayerNorm(embed_dim)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x: torch.Tensor, embed_weight: torch.Tensor) -> torch.Tensor:
        return F.linear(self.layer_norm(F.gelu(self.dense(x))), embed_weight) + self.bias


class ESM2(nn.Module):
    family = "esm2"
    bos_name = "bos"  # the <cls> token's output column: bos_<L>, as fair-esm's `--include bos`
    specials = (1, 1)  # tokens before and after the residues (<cls>, <eos>): not in means and per-token outputs
    # on a GPU, compiled layers fuse the norms, rotary and residual adds (bench/README.md, "Model throughput")
    compile_pays = True

    def __init__(self, config: ESM2Config, num_layers_to_run: int | None = None, lm_head: bool = False):
        super().__init__()
        self.config = config
        d = config.embed_dim
        n = config.num_layers if num_layers_to_run is None else num_layers_to_run
        if not 1 <= n <= config.num_layers:
            raise ValueError(f"repr layer {n} is outside 1..{config.num_layers}")
        self.embed_tokens = nn.Embedding(config.vocab_size, d, padding_idx=PAD)
        self.layers = nn.ModuleList(TransformerLayer(d, 4 * d, config.attention_heads) for _ in range(n))
        # applied only when the requested representation is the last layer's, as in fair-esm
        self.emb_layer_norm_after = nn.LayerNorm(d) if n == config.num_layers else None
        # the masked-LM head (`--include logits`), when the checkpoint has it
        self.lm_head = LMHead(d, config.vocab_size) if lm_head and self.emb_layer_norm_after is not None else None
        self.backend = Backend("sdpa", "not selected yet")

    @property
    def dim(self) -> int:
        return self.config.embed_dim

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def forward(self, tokens: torch.Tensor, packing: Packing, layers: list[nn.Module] | None = None) -> torch.Tensor:
        """tokens: int [T] packed ids -> last layer's hidden states [T, D]. `layers`: run these in place
        of `self.layers` (their compiled versions, `compiled_layers()`)."""
        return self.hidden_states(tokens, packing, (self.num_layers,), layers)[self.num_layers]

    def hidden_states(self, tokens: torch.Tensor, packing: Packing, keep: tuple[int, ...],
                      layers: list[nn.Module] | None = None) -> dict[int, torch.Tensor]:
        """The hidden states [T, D] after each layer in `keep`, as fair-esm numbers them: 0 is the
        embedding output, the last layer's comes after the final layer norm. Layers past the deepest
        one kept are not run."""
        x = self.embed_tokens(tokens)
        if self.config.token_dropout:
            # ESM-2 was trained with masked tokens zeroed and the rest scaled by (1 - 0.12) / (1 -
            # observed mask ratio); the scaling stays on at inference.
            is_mask = tokens == MASK
            x = x.masked_fill(is_mask[:, None], 0.0)
            masked = torch.zeros(packing.num_sequences, device=x.device).index_add_(
                0, packing.seq_index, is_mask.float())
            ratio = masked / packing.lengths
            x = x * ((1 - 0.15 * 0.8) / (1 - ratio))[packing.seq_index, None].to(x.dtype)
        rotary = rotary_tables(packing.position, self.config.embed_dim // self.config.attention_heads)
        out = {0: x} if 0 in keep else {}
        layers = list(self.layers if layers is None else layers)[:max(keep)]
        for i, layer in enumerate(layers, 1):
            x = layer(x, packing, self.backend, rotary)
            if i in keep:
                last = i == self.config.num_layers and self.emb_layer_norm_after is not None
                out[i] = self.emb_layer_norm_after(x) if last else x
        return out

    def logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """Masked-LM logits [T, vocab] from the last layer's hidden states (after its final layer norm)."""
        if self.lm_head is None:
            raise ValueError("logits need the checkpoint's LM head (lm_head.*), which this model lacks")
        return self.lm_head(last_hidden, self.embed_tokens.weight)

    def compiled_layers(self) -> list[nn.Module]:
        """Each layer under torch.compile for dynamic token counts, sharing its weights: fuses norms,
        rotary, GELU and residual adds around the GEMMs and the flash kernel (bench/README.md, "Model
        throughput"). Nothing compiles until they first run; `self.layers` stay as they were, so
        batches can run eagerly while another thread compiles (actors.embedder)."""
        from virnucpro.kernels.compiling import compiled

        return compiled(list(self.layers))

    def compile_layers(self) -> None:
        """Compile the layers in place (scripts that compile before they run anything)."""
        from virnucpro.kernels.compiling import compile_in_place

        compile_in_place(list(self.layers))

    def embed(self, tokens: torch.Tensor, packing: Packing, layers: list[nn.Module] | None = None) -> torch.Tensor:
        """Mean over residue positions (no <cls>, no <eos>), float32 [B, D]."""
        return packing.mean(self(tokens, packing, layers), skip_first=1, skip_last=1)


# --- checkpoint loading (helpers shared with DNABERT-S: virnucpro.models.loading) ---------------------

_PREFIX = re.compile(r"^(encoder\.sentence_encoder\.|encoder\.)")
_IGNORED = re.compile(r"^(lm_head\.weight$|contact_head\.|.*rot_emb\.inv_freq$|.*self_attn\.bias_[kv]$)")


def read_checkpoint(path: str | Path, shapes_only: bool = False) -> tuple[ESM2Config, dict[str, torch.Tensor]]:
    """Read a fair-esm ESM-2 `.pt` checkpoint without unpickling anything but tensors and its cfg, or a
    Hugging Face ESM-2 directory (`read_hf_checkpoint`), under fair-esm's parameter names. Tensors are
    memory-mapped (read when used); with `shapes_only` an HF directory's are meta tensors."""
    path = Path(path)
    if path.is_dir():
        return read_hf_checkpoint(path, shapes_only)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such ESM-2 checkpoint file")
    # fair-esm stores its config as an argparse.Namespace: allow exactly that class, nothing else.
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            data = load_weights_only(path, mmap=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
            raise CheckpointError(f"{path}: not a readable fair-esm checkpoint ({load_error(e)})") from None
    if not isinstance(data, dict) or "model" not in data:
        raise CheckpointError(f"{path}: not a fair-esm checkpoint (no 'model' state dict)")
    state = {_PREFIX.sub("", k): v for k, v in data["model"].items()}
    if "embed_tokens.weight" not in state or not any(k.startswith("layers.") for k in state):
        raise CheckpointError(f"{path}: not an ESM-2 checkpoint (no embed_tokens / layers parameters)")
    return _config(path, data, state), state


def _config(path: Path, data: dict, state: dict[str, torch.Tensor]) -> ESM2Config:
    num_layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
    embed_dim = state["embed_tokens.weight"].shape[1]
    cfg = data.get("cfg", {}).get("model") if isinstance(data.get("cfg"), dict) else None
    cfg = vars(cfg) if isinstance(cfg, argparse.Namespace) else (cfg or {})
    heads = cfg.get("encoder_attention_heads") or KNOWN_SHAPES.get(path.stem, (0, 0, 0))[2]
    if not heads:
        raise CheckpointError(f"{path}: checkpoint cfg does not say the number of attention heads")
    if cfg.get("encoder_layers", num_layers) != num_layers or cfg.get("encoder_embed_dim", embed_dim) != embed_dim:
        raise CheckpointError(f"{path}: cfg ({cfg.get('encoder_layers')} layers, dim "
                              f"{cfg.get('encoder_embed_dim')}) disagrees with the weights "
                              f"({num_layers} layers, dim {embed_dim})")
    return ESM2Config(num_layers, embed_dim, int(heads), bool(cfg.get("token_dropout", True)))


# --- Hugging Face ESM-2 directories: config.json and weights translated to fair-esm's -----------------

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # each may be sharded: NAME.index.json
# EsmModel's parameter names (after EsmForMaskedLM's "esm." prefix) -> fair-esm's; lm_head.* (dense,
# layer_norm, bias) and contact_head.* are named alike in both, but for the decoder's weight.
_HF_NAMES = [(re.compile(pattern), name) for pattern, name in (
    (r"embeddings\.word_embeddings\.", "embed_tokens."),
    (r"encoder\.layer\.(\d+)\.attention\.self\.query\.", r"layers.\1.self_attn.q_proj."),
    (r"encoder\.layer\.(\d+)\.attention\.self\.key\.", r"layers.\1.self_attn.k_proj."),
    (r"encoder\.layer\.(\d+)\.attention\.self\.value\.", r"layers.\1.self_attn.v_proj."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.self_attn.out_proj."),
    (r"encoder\.layer\.(\d+)\.attention\.LayerNorm\.", r"layers.\1.self_attn_layer_norm."),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.fc1."),
    (r"encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.fc2."),
    (r"encoder\.layer\.(\d+)\.LayerNorm\.", r"layers.\1.final_layer_norm."),
    (r"encoder\.emb_layer_norm_after\.", "emb_layer_norm_after."),
    (r"lm_head\.decoder\.weight$", "lm_head.weight"),
)]
# buffers and heads that fair-esm's ESM-2 does not have: EsmModel's pooler, rotary frequencies, position ids
_HF_DROPPED = re.compile(r"^(pooler\.|.*rotary_embeddings\.inv_freq$|embeddings\.position_ids$)")
# transformers 5 writes LayerNorm parameters under their legacy (TF BERT) names, gamma and beta
_HF_LEGACY_NORM = {"gamma": "weight", "beta": "bias"}


def hf_config(model_dir: Path) -> ESM2Config:
    """config.json of an HF ESM directory as ESM2Config, refusing what is not ESM-2's architecture (our
    module has ESM-2's: rotary positions, no embedding layer norm, FFN 4x wide, layer norm eps 1e-5)."""
    try:
        raw = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{model_dir}/config.json: not readable ({type(e).__name__}: {e})") from None
    where = f"{model_dir}/config.json"
    if raw.get("is_folding_model"):
        raise CheckpointError(f"{where}: an ESMFold model; give its ESM-2 language model instead")
    need = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")
    if not all(isinstance(raw.get(k), int) for k in need):
        raise CheckpointError(f"{where}: needs integer {', '.join(need)}")
    layers, dim, heads = raw["num_hidden_layers"], raw["hidden_size"], raw["num_attention_heads"]
    for refusal in _hf_refusals(raw, dim, heads):
        raise CheckpointError(f"{where}: {refusal}")
    check_esm_vocab(model_dir)
    # transformers' EsmConfig defaults token_dropout to False; ESM-2's configs say true
    return ESM2Config(layers, dim, heads, bool(raw.get("token_dropout", False)))


def _hf_refusals(raw: dict, dim: int, heads: int) -> list[str]:
    """What in an ESM config.json describes a model other than ESM-2 (transformers' defaults apply to
    what is missing, as transformers would read it; a missing layer_norm_eps is taken as ESM-2's)."""
    position = raw.get("position_embedding_type", "absolute")
    eps = raw.get("layer_norm_eps", 1e-5)
    rope_theta = raw.get("rope_theta", 10000.0)
    mask = raw.get("mask_token_id")
    checks = [
        (position != "rotary", f"position_embedding_type '{position}': ESM-2 has rotary positions "
                               f"(absolute positions are ESM-1b's)"),
        (bool(raw.get("emb_layer_norm_before")), "emb_layer_norm_before is true: ESM-2 has no embedding "
                                                 "layer norm (that is ESM-1b)"),
        (raw["intermediate_size"] != 4 * dim, f"intermediate_size {raw['intermediate_size']} is not 4 x "
                                              f"hidden_size {dim}, as in ESM-2"),
        (heads <= 0 or dim % heads or (dim // heads) % 2, f"hidden_size {dim} does not split into "
                                                          f"{heads} heads of even width"),
        (raw.get("vocab_size", len(ALPHABET)) != len(ALPHABET), f"vocab_size {raw.get('vocab_size')}: "
                                                                f"ESM-2 has {len(ALPHABET)} tokens"),
        (not isinstance(eps, (int, float)) or abs(eps - 1e-5) > 1e-9, f"layer_norm_eps {eps}: ESM-2's is 1e-05"),
        (rope_theta != 10000, f"rope_theta {rope_theta}: ESM-2's is 10000"),
        (bool(raw.get("token_dropout")) and mask not in (None, MASK),
         f"mask_token_id {mask}: ESM-2's <mask> is {MASK}"),
    ]
    return [message for refused, message in checks if refused]


def _hf_weight_files(model_dir: Path) -> dict[str, Path]:
    """Parameter name -> the file holding it: one weights file, or the shards its index names."""
    for name in HF_WEIGHT_FILES:
        if (model_dir / name).is_file():
            return {"": model_dir / name}
        index = model_dir / f"{name}.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a readable shard index ({type(e).__name__})") from None
            return {k: model_dir / v for k, v in weight_map.items()}
    raise CheckpointError(f"{model_dir}: no {' or '.join(HF_WEIGHT_FILES)} (nor a sharded index of one)")


def _read_hf_file(path: Path, shapes_only: bool) -> dict[str, torch.Tensor]:
    """One weights file's tensors, memory-mapped (safetensors' tensors map the file; torch.load with
    mmap), or with `shapes_only` as meta tensors: nothing of the weights is read."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), "pt") as f:
                if shapes_only:
                    return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
                return {k: f.get_tensor(k) for k in f.keys()}
        state = load_weights_only(path, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unpickling or format failure is a bad weights file
        raise CheckpointError(f"{path}: not a readable weights file ({load_error(e)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    if shapes_only:
        return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items()}
    return state


def _fair_esm_name(hf_name: str) -> str | None:
    """An EsmModel / EsmForMaskedLM parameter's fair-esm name; None for what fair-esm lacks; an unknown
    name is kept as it is, for the state check to report."""
    name = re.sub(r"(?<=LayerNorm\.)(gamma|beta)$", lambda m: _HF_LEGACY_NORM[m.group(1)],
                  hf_name.removeprefix("esm."))
    if _HF_DROPPED.match(name):
        return None
    for pattern, replacement in _HF_NAMES:
        if pattern.match(name):
            return pattern.sub(replacement, name, count=1)
    return name


def read_hf_checkpoint(model_dir: Path, shapes_only: bool = False) -> tuple[ESM2Config, dict[str, torch.Tensor]]:
    """A Hugging Face ESM-2 directory as fair-esm's config and state dict (see `read_checkpoint`)."""
    config = hf_config(model_dir)
    files = _hf_weight_files(model_dir)
    state: dict[str, torch.Tensor] = {}
    for path in dict.fromkeys(files.values()):
        for k, v in _read_hf_file(path, shapes_only).items():
            name = _fair_esm_name(k)
            if name is not None:
                state[name] = v
    if "embed_tokens.weight" not in state or not any(re.match(r"layers\.\d+\.", k) for k in state):
        raise CheckpointError(f"{model_dir}: weights are not ESM's (no word_embeddings / encoder.layer parameters)")
    layers = 1 + max(int(m.group(1)) for m in map(re.compile(r"layers\.(\d+)\.").match, state) if m)
    dim = state["embed_tokens.weight"].shape[1]
    if (layers, dim) != (config.num_layers, config.embed_dim):
        raise CheckpointError(f"{model_dir}: config.json ({config.num_layers} layers, hidden_size {config.embed_dim}) "
                              f"disagrees with the weights ({layers} layers, dim {dim})")
    if "lm_head.dense.weight" in state and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]  # tied, as fair-esm's (not saved by transformers)
    return config, state


def _fused_state(state: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """fair-esm parameter names -> ours (q/k/v fused, heads dropped, layers past n dropped)."""
    out = {}
    for k, v in state.items():
        if _IGNORED.match(k):
            continue
        m = re.match(r"layers\.(\d+)\.", k)
        if m and int(m.group(1)) >= n_layers:
            continue
        if re.search(r"self_attn\.[qkv]_proj\.", k):
            continue
        out[k] = v
    for i in range(n_layers):
        for kind in ("weight", "bias"):
            parts = [state.get(f"layers.{i}.self_attn.{p}_proj.{kind}") for p in "qkv"]
            if any(p is None for p in parts):
                raise CheckpointError(f"checkpoint lacks layers.{i}.self_attn q/k/v_proj.{kind}")
            out[f"layers.{i}.self_attn.qkv_proj.{kind}"] = _concatenated(parts)
    return out


def _concatenated(parts: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat along dim 0; for meta tensors (a check), only the shape: a meta-device cat runs
    through torch._refs, which imports torch._dynamo (see `on_meta_device`)."""
    if parts[0].is_meta:
        return torch.empty((sum(p.shape[0] for p in parts), *parts[0].shape[1:]), dtype=parts[0].dtype, device="meta")
    return torch.cat(parts, 0)


def _matched(path: str | Path, config: ESM2Config, state: dict[str, torch.Tensor],
             n: int) -> tuple[ESM2, dict[str, torch.Tensor]]:
    """Our module on the meta device and the checkpoint's parameters under its names, checked: every
    name present, none left over, every shape as the architecture says."""
    with on_meta_device():
        model = ESM2(config, n, lm_head="lm_head.dense.weight" in state)
    ours = _fused_state(state, n)
    if model.emb_layer_norm_after is None:
        ours = {k: v for k, v in ours.items() if not k.startswith("emb_layer_norm_after.")}
    if model.lm_head is None:
        ours = {k: v for k, v in ours.items() if not k.startswith("lm_head.")}
    check_state_dict(model.state_dict(), ours, path, "ESM-2")
    return model, ours


def check_esm2(path: str | Path) -> ESM2Config:
    """Check a checkpoint's parameter names and shapes without loading its weights (the driver does
    this before any actor starts, so a bad file fails in seconds, not after GPU actors come up)."""
    return _checked(path)[0]


def _checked(path: str | Path) -> tuple[ESM2Config, ESM2]:
    config, state = read_checkpoint(path, shapes_only=True)  # memory-mapped or meta: no weight is read
    meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items()}
    return config, _matched(path, config, meta, config.num_layers)[0]


def load_esm2(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
              repr_layer: int | None = None, attention_backend: str = "auto") -> ESM2:
    """Load a fair-esm ESM-2 checkpoint into our module, on `device` in `dtype`, in eval mode."""
    config, state = read_checkpoint(path)  # memory-mapped: each tensor is read as it goes to the device
    n = config.num_layers if repr_layer is None or repr_layer < 0 else repr_layer
    with in_background(torch.device(device), select_backend, torch.device(device), dtype, alibi=False,
                       requested=attention_backend, head_dim=config.embed_dim // config.attention_heads) as backend:
        state = to_device({k: v for k, v in state.items() if not _IGNORED.match(k)}, device, dtype)
        model, ours = _matched(path, config, state, n)  # q/k/v fused on the device
        model.load_state_dict(ours, assign=True)
    model.backend = backend.result()
    log.info("ESM-2 %d layers x %d dim from %s on %s/%s: %s", n, config.embed_dim, Path(path).name,
             device, str(dtype).removeprefix("torch."), model.backend.describe())
    return model.eval().requires_grad_(False)


def load(path: Path, device: torch.device | str, dtype: torch.dtype, attention_backend: str = "auto") -> ESM2:
    """The registry's loader (`virnucpro.models.registry.FAMILIES`)."""
    return load_esm2(path, device, dtype, attention_backend=attention_backend)


def describe(path: Path) -> dict:
    """The registry's check: the weights' names and shapes checked without loading them; the width, the
    layers and whether the checkpoint has an LM head (logits)."""
    config, model = _checked(path)
    return {"dim": config.embed_dim, "layers": config.num_layers, "logits": model.lm_head is not None,
            "bos_name": model.bos_name}
