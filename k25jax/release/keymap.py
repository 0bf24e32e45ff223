"""Release tensor names <-> k25jax parameter paths: the only place release names appear.

:func:`release_entries` lists, for a config, every tensor a release must hold (name, shape, dtype) and
where it lands in the k25jax parameter tree, with the layout transform each way. Release linear weights
are ``[out, in]`` (torch layout); k25jax keeps ``[in, out]`` with heads split out, and stacks layers
(and experts) on leading axes. The loader checks files against this list: every tensor used exactly once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from k25jax import quant
from k25jax.config import K25Config, TextConfig, VisionConfig
from k25jax.transpose import transpose2d

# safetensors dtype names
BF16, F32, I32 = "BF16", "F32", "I32"


@dataclass(frozen=True)
class Source:
    """One tensor in the release files."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class Target:
    """A slot of a k25jax parameter: its state path and the index into its stacked leading axes."""

    path: tuple[str, ...]
    index: tuple[int, ...] = ()


@dataclass(frozen=True)
class Entry:
    """Release sources -> k25jax targets, both ways.

    ``load(source arrays) -> target slot arrays`` and its exact inverse ``store(target slot arrays) -> source
    arrays`` (pure layout moves: transposes, reshapes, the INT4 repacking; never a change of dtype).

    ``row_axis``: set on single-source, single-target entries whose source rows map one to one onto an axis of
    the target slot (plain transposes and copies): ``load`` of a row block ``source[r0:r1]`` is the slot
    restricted to ``[r0:r1]`` on ``row_axis``, and ``store`` maps that block back. Converters use it to stream
    big tensors (the 2.3 GB embedding and lm_head) in row blocks instead of whole.
    """

    sources: tuple[Source, ...]
    targets: tuple[Target, ...]
    load: Callable[[Sequence[np.ndarray]], list[np.ndarray]]
    store: Callable[[Sequence[np.ndarray]], list[np.ndarray]]
    kind: str = "dense"  # "dense" | "expert" (INT4 packed or plain routed-expert weight)
    row_axis: int | None = None

    @property
    def key(self) -> str:
        """A stable identifier: the first source's name."""
        return self.sources[0].name


def _t(a: np.ndarray) -> np.ndarray:
    """The 2-D transpose, as a contiguous copy (every layout move below is one, plus free reshapes)."""
    return transpose2d(a)


def _same(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [arrays[0]]


def _transposed(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [_t(arrays[0])]


def text_prefix(cfg: K25Config) -> str:
    return "" if cfg.layout == "deepseek_v3" else "language_model."


def layer_slot(t: TextConfig, layer: int) -> tuple[str, int]:
    """Decoder layer index -> (stack name, index in that stack)."""
    if layer < t.num_dense_layers:
        return "dense_layers", layer
    return "moe_layers", layer - t.num_dense_layers


def _linear(name: str, out_dim: int, in_dim: int, target: Target) -> Entry:
    """``[out, in]`` -> ``[in, out]``: source row ``o`` is slot column ``o``."""
    source = Source(name, (out_dim, in_dim), BF16)
    return Entry((source,), (target,), _transposed, _transposed, row_axis=1)


def _norm(name: str, dim: int, target: Target) -> Entry:
    return Entry((Source(name, (dim,), BF16),), (target,), _same, _same, row_axis=0)


def _attention_entries(t: TextConfig, p: str, stack: tuple[str, ...], i: int) -> list[Entry]:
    D, H = t.hidden_size, t.num_attention_heads
    C, R, Kn, Kv, Kqk = t.kv_lora_rank, t.qk_rope_head_dim, t.qk_nope_head_dim, t.v_head_dim, t.qk_head_dim
    a = stack + ("attn",)

    def tgt(*names: str) -> Target:
        return Target(a + names, (i,))

    def per_head_in(arr):  # [H*K, in] -> [in, H, K]
        return [_t(arr[0]).reshape(-1, H, Kqk)]

    def per_head_out(arr):  # [in, H, K] -> [H*K, in]
        return [_t(arr[0].reshape(-1, H * Kqk))]

    out: list[Entry] = []
    if t.q_lora_rank is None:
        out.append(
            Entry((Source(f"{p}q_proj.weight", (H * Kqk, D), BF16),), (tgt("q_proj"),), per_head_in, per_head_out)
        )
    else:
        Q = t.q_lora_rank
        out.append(_linear(f"{p}q_a_proj.weight", Q, D, tgt("q_a_proj")))
        out.append(_norm(f"{p}q_a_layernorm.weight", Q, tgt("q_a_norm", "weight")))
        out.append(
            Entry((Source(f"{p}q_b_proj.weight", (H * Kqk, Q), BF16),), (tgt("q_b_proj"),), per_head_in, per_head_out)
        )
    out.append(_linear(f"{p}kv_a_proj_with_mqa.weight", C + R, D, tgt("kv_a_proj")))
    out.append(_norm(f"{p}kv_a_layernorm.weight", C, tgt("kv_a_norm", "weight")))

    def split_kv_b(arr):  # [H*(Kn+Kv), C] -> k_up [C, H, Kn], v_up [C, H, Kv]
        w = _t(arr[0]).reshape(C, H, Kn + Kv)
        return [np.ascontiguousarray(w[..., :Kn]), np.ascontiguousarray(w[..., Kn:])]

    def join_kv_b(arr):  # k_up [C, H, Kn], v_up [C, H, Kv] -> [H*(Kn+Kv), C]
        return [_t(np.concatenate([arr[0], arr[1]], axis=-1).reshape(C, H * (Kn + Kv)))]

    out.append(
        Entry(
            (Source(f"{p}kv_b_proj.weight", (H * (Kn + Kv), C), BF16),),
            (tgt("k_up"), tgt("v_up")),
            split_kv_b,
            join_kv_b,
        )
    )
    out.append(
        Entry(
            (Source(f"{p}o_proj.weight", (D, H * Kv), BF16),),
            (tgt("o_proj"),),
            lambda arr: [_t(arr[0]).reshape(H, Kv, D)],  # [D, H*Kv] -> [H, Kv, D]
            lambda arr: [_t(arr[0].reshape(H * Kv, D))],
        )
    )
    return out


def _mlp_entries(p: str, D: int, F: int, base: tuple[str, ...], index: tuple[int, ...]) -> list[Entry]:
    return [
        _linear(f"{p}gate_proj.weight", F, D, Target(base + ("gate_proj",), index)),
        _linear(f"{p}up_proj.weight", F, D, Target(base + ("up_proj",), index)),
        _linear(f"{p}down_proj.weight", D, F, Target(base + ("down_proj",), index)),
    ]


def _expert_entries(cfg: K25Config, p: str, out_dim: int, in_dim: int, target: Target) -> list[Entry]:
    """A routed-expert projection ``[out, in]``: INT4 pack-quantized, or plain bf16 when unquantized.

    INT4 tensors go to the two arrays of an :class:`~k25jax.quant.Int4Weight` (``<target>/packed`` and
    ``<target>/scales``), repacked to the device layout; they are never dequantized. Two entries, one per
    array (``weight_shape`` goes with the words and is checked), so that filling either array reads only its
    own tensors.
    """
    q = cfg.quantization
    if q is None:
        source = Source(f"{p}.weight", (out_dim, in_dim), BF16)
        return [Entry((source,), (target,), _transposed, _transposed, "expert", row_axis=1)]
    words = -(-in_dim // quant.NIBBLES_PER_WORD)

    def load_words(arrays):
        packed, shape = arrays
        if tuple(int(s) for s in shape) != (out_dim, in_dim):
            raise ValueError(f"tensor {p}.weight_shape holds {[int(s) for s in shape]}, expected {[out_dim, in_dim]}")
        return [quant.words_to_device(packed)]

    def store_words(arrays):
        return [quant.words_to_release(arrays[0]), np.array([out_dim, in_dim], np.int32)]

    return [
        Entry(
            (Source(f"{p}.weight_packed", (out_dim, words), I32), Source(f"{p}.weight_shape", (2,), I32)),
            (Target(target.path + ("packed",), target.index),),
            load_words,
            store_words,
            "expert",
        ),
        Entry(
            (Source(f"{p}.weight_scale", (out_dim, in_dim // q.group_size), BF16),),
            (Target(target.path + ("scales",), target.index),),
            lambda a: [quant.scales_to_device(a[0])],
            lambda a: [quant.scales_to_release(a[0])],
            "expert",
        ),
    ]


def text_entries(cfg: K25Config) -> list[Entry]:
    t = cfg.text
    pre = text_prefix(cfg)
    D, V = t.hidden_size, t.vocab_size
    out = [
        Entry(
            (Source(f"{pre}model.embed_tokens.weight", (V, D), BF16),),
            (Target(("text", "embed_tokens")),),
            _same,
            _same,
            row_axis=0,
        ),
        _norm(f"{pre}model.norm.weight", D, Target(("text", "norm", "weight"))),
        _linear(f"{pre}lm_head.weight", V, D, Target(("text", "lm_head"))),
    ]
    for layer in range(t.num_hidden_layers):
        stack_name, i = layer_slot(t, layer)
        stack = ("text", stack_name)
        p = f"{pre}model.layers.{layer}."
        out.append(_norm(f"{p}input_layernorm.weight", D, Target(stack + ("input_norm", "weight"), (i,))))
        out.append(_norm(f"{p}post_attention_layernorm.weight", D, Target(stack + ("post_attn_norm", "weight"), (i,))))
        out += _attention_entries(t, f"{p}self_attn.", stack, i)
        mlp = stack + ("mlp",)
        if stack_name == "dense_layers":
            out += _mlp_entries(f"{p}mlp.", D, t.intermediate_size, mlp, (i,))
            continue
        E, F = t.n_routed_experts, t.moe_intermediate_size
        out.append(_linear(f"{p}mlp.gate.weight", E, D, Target(mlp + ("router",), (i,))))
        out.append(
            Entry(
                (Source(f"{p}mlp.gate.e_score_correction_bias", (E,), F32),),
                (Target(mlp + ("correction_bias",), (i,)),),
                _same,
                _same,
                row_axis=0,
            )
        )
        if t.n_shared_experts:
            out += _mlp_entries(f"{p}mlp.shared_experts.", D, F * t.n_shared_experts, mlp + ("shared",), (i,))
        experts = mlp + ("experts",)
        for e in range(E):
            ep = f"{p}mlp.experts.{e}."
            out += _expert_entries(cfg, ep + "gate_proj", F, D, Target(experts + ("gate_proj",), (i, e)))
            out += _expert_entries(cfg, ep + "up_proj", F, D, Target(experts + ("up_proj",), (i, e)))
            out += _expert_entries(cfg, ep + "down_proj", D, F, Target(experts + ("down_proj",), (i, e)))
    return out


def _vector(name: str, dim: int, target: Target) -> Entry:
    return Entry((Source(name, (dim,), BF16),), (target,), _same, _same, row_axis=0)


def _layer_norm(name: str, dim: int, path: tuple[str, ...], index: tuple[int, ...] = ()) -> list[Entry]:
    return [
        _vector(f"{name}.weight", dim, Target(path + ("weight",), index)),
        _vector(f"{name}.bias", dim, Target(path + ("bias",), index)),
    ]


def vision_entries(cfg: K25Config) -> list[Entry]:
    """The MoonViT tower (``vision_tower.*``) and the patch-merger projector (``mm_projector.*``).

    ``wqkv [3*H*K, D]`` is ``[q | k | v]``, heads outermost; the q and k head dims are in the interleaved
    rope-pair order, which is the order ``k25jax.vision.moonvit.vision_rope`` computes in: the rows load
    unpermuted (transformers instead permutes them to split-half order at load, ``PermuteForRope``).
    """
    v: VisionConfig = cfg.vision
    D, H, K, F, ps = v.hidden_size, v.num_attention_heads, v.head_dim, v.intermediate_size, v.patch_size
    tower = ("vision",)
    out = [
        Entry(  # Conv2d weight [D, 3, ps, ps] -> [3, ps, ps, D]
            (Source("vision_tower.patch_embed.proj.weight", (D, 3, ps, ps), BF16),),
            (Target(tower + ("patch_proj",)),),
            lambda a: [_t(a[0].reshape(D, -1)).reshape(3, ps, ps, D)],
            lambda a: [_t(a[0].reshape(-1, D)).reshape(D, 3, ps, ps)],
        ),
        _vector("vision_tower.patch_embed.proj.bias", D, Target(tower + ("patch_bias",))),
        Entry(
            (Source("vision_tower.patch_embed.pos_emb.weight", (v.pos_emb_height, v.pos_emb_width, D), BF16),),
            (Target(tower + ("pos_emb",)),),
            _same,
            _same,
            row_axis=0,
        ),
    ]
    blocks = tower + ("blocks",)
    for b in range(v.num_hidden_layers):
        p = f"vision_tower.encoder.blocks.{b}."
        i = (b,)
        out += _layer_norm(p + "norm0", D, blocks + ("attn_norm",), i)
        out.append(
            Entry(  # [3*H*K, D] -> [D, 3, H, K]
                (Source(p + "wqkv.weight", (3 * D, D), BF16),),
                (Target(blocks + ("qkv_proj",), i),),
                lambda a: [_t(a[0]).reshape(D, 3, H, K)],
                lambda a: [_t(a[0].reshape(D, 3 * D))],
            )
        )
        out.append(
            Entry(
                (Source(p + "wqkv.bias", (3 * D,), BF16),),
                (Target(blocks + ("qkv_bias",), i),),
                lambda a: [a[0].reshape(3, H, K)],
                lambda a: [a[0].reshape(3 * D)],
            )
        )
        out.append(
            Entry(  # [D, H*K] -> [H, K, D]
                (Source(p + "wo.weight", (D, D), BF16),),
                (Target(blocks + ("out_proj",), i),),
                lambda a: [_t(a[0]).reshape(H, K, D)],
                lambda a: [_t(a[0].reshape(D, D))],
            )
        )
        out.append(_vector(p + "wo.bias", D, Target(blocks + ("out_bias",), i)))
        out += _layer_norm(p + "norm1", D, blocks + ("mlp_norm",), i)
        out.append(_linear(p + "mlp.fc0.weight", F, D, Target(blocks + ("mlp_in",), i)))
        out.append(_vector(p + "mlp.fc0.bias", F, Target(blocks + ("mlp_in_bias",), i)))
        out.append(_linear(p + "mlp.fc1.weight", D, F, Target(blocks + ("mlp_out",), i)))
        out.append(_vector(p + "mlp.fc1.bias", D, Target(blocks + ("mlp_out_bias",), i)))
    out += _layer_norm("vision_tower.encoder.final_layernorm", D, tower + ("final_norm",))
    W, Dt = v.merged_dim, v.text_hidden_size
    proj = ("projector",)
    out += _layer_norm("mm_projector.pre_norm", v.mm_hidden_size, proj + ("norm",))
    out.append(_linear("mm_projector.proj.0.weight", W, W, Target(proj + ("in_proj",))))
    out.append(_vector("mm_projector.proj.0.bias", W, Target(proj + ("in_bias",))))
    out.append(_linear("mm_projector.proj.2.weight", Dt, W, Target(proj + ("out_proj",))))
    out.append(_vector("mm_projector.proj.2.bias", Dt, Target(proj + ("out_bias",))))
    return out


def release_entries(cfg: K25Config) -> list[Entry]:
    """Every tensor the release of ``cfg`` holds, with its destination. Order: text stack, then vision."""
    out = text_entries(cfg)
    if cfg.vision is not None:
        out += vision_entries(cfg)
    return out


def release_tensor_count(cfg: K25Config) -> int:
    return sum(len(e.sources) for e in release_entries(cfg))
