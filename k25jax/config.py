"""Model configuration: frozen dataclasses read from the released ``config.json`` exactly as shipped.

The release nests a DeepSeek-V3 style ``text_config`` and a MoonViT ``vision_config`` (raw ``vt_*`` names)
under a top-level ``kimi_k25`` config; ``quantization_config`` sits at the top level or inside
``text_config``. A plain DeepSeek-V3 / Kimi-K2 ``config.json`` (text only) is accepted too.

Every required field missing, every unsupported value and every inconsistency raises :class:`ConfigError`
naming the field (``text_config.n_group`` ...). See ``shared/docs/k25-architecture.md`` section 1. The readers
and writers (release ``config.json``, YAML presets) are in :mod:`k25jax.release.config`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A config field is missing, unsupported or inconsistent. The message names the field."""


# --------------------------------------------------------------------------------------------------------
# Sub-configs
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class YarnRope:
    """YaRN rope scaling parameters (``rope_scaling`` / ``rope_parameters`` with type ``yarn``)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass(frozen=True)
class QuantConfig:
    """Weight-only INT4 quantization of the routed experts (compressed-tensors ``pack-quantized``)."""

    num_bits: int = 4
    group_size: int = 32
    symmetric: bool = True
    format: str = "pack-quantized"
    ignore: tuple[str, ...] = ()


@dataclass(frozen=True)
class TextConfig:
    """The DeepSeek-V3 style MLA + MoE decoder (``text_config``)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    first_k_dense_replace: int
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    rms_norm_eps: float = 1e-6
    # The q_a / kv_a latent norms use 1e-6 in the DeepSeek reference code and in transformers, but
    # rms_norm_eps in vLLM / SGLang (architecture doc section 2): a field of its own.
    latent_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: YarnRope | None = None
    max_position_embeddings: int = 4096

    # Derived sizes ------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_dense_layers(self) -> int:
        return min(self.first_k_dense_replace, self.num_hidden_layers)

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.num_dense_layers

    @property
    def attention_scale(self) -> float:
        """``qk_head_dim^-0.5 * m^2`` with the YaRN ``m`` when ``mscale_all_dim`` is set (section 2.5)."""
        scale = self.qk_head_dim**-0.5
        y = self.rope_scaling
        if y is not None and y.mscale_all_dim:
            m = yarn_mscale(y.factor, y.mscale_all_dim)
            scale *= m * m
        return scale

    @property
    def latent_cache_dim(self) -> int:
        """Values per token per layer in the absorbed-MLA cache: ``kv_lora_rank + qk_rope_head_dim``."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def validate(self) -> None:
        _positive(
            self,
            "text_config",
            [
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "moe_intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "kv_lora_rank",
                "qk_nope_head_dim",
                "qk_rope_head_dim",
                "v_head_dim",
                "n_routed_experts",
                "num_experts_per_tok",
                "n_group",
                "topk_group",
            ],
        )
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ConfigError(f"text_config.q_lora_rank must be positive or null, got {self.q_lora_rank}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"text_config.qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.n_routed_experts % self.n_group:
            raise ConfigError(
                f"text_config.n_routed_experts ({self.n_routed_experts}) must be divisible by "
                f"text_config.n_group ({self.n_group})"
            )
        if self.topk_group > self.n_group:
            raise ConfigError(
                f"text_config.topk_group ({self.topk_group}) exceeds text_config.n_group ({self.n_group})"
            )
        per_group = self.n_routed_experts // self.n_group
        if self.n_group > 1 and per_group < 2:
            raise ConfigError(
                "text_config.n_group: group-limited routing scores each group by its top-2 experts, "
                f"so groups need >= 2 experts (got {per_group})"
            )
        if self.num_experts_per_tok > self.topk_group * per_group:
            raise ConfigError(
                f"text_config.num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts "
                f"in topk_group ({self.topk_group}) groups of {per_group}"
            )
        if self.first_k_dense_replace < 0:
            raise ConfigError(f"text_config.first_k_dense_replace must be >= 0, got {self.first_k_dense_replace}")
        if self.n_shared_experts < 0:
            raise ConfigError(f"text_config.n_shared_experts must be >= 0, got {self.n_shared_experts}")


@dataclass(frozen=True)
class VisionConfig:
    """MoonViT-3D encoder plus the patch-merger projector (``vision_config``, raw ``vt_*`` release names)."""

    hidden_size: int = 1152
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    intermediate_size: int = 4304
    patch_size: int = 14
    pos_emb_height: int = 64
    pos_emb_width: int = 64
    pos_emb_time: int = 4
    merge_kernel_size: tuple[int, int] = (2, 2)
    mm_hidden_size: int = 1152
    text_hidden_size: int = 7168
    projector_ln_eps: float = 1e-5
    layer_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def merged_dim(self) -> int:
        return self.mm_hidden_size * self.merge_kernel_size[0] * self.merge_kernel_size[1]

    def validate(self) -> None:
        _positive(
            self,
            "vision_config",
            [
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "intermediate_size",
                "patch_size",
                "pos_emb_height",
                "pos_emb_width",
                "pos_emb_time",
                "mm_hidden_size",
                "text_hidden_size",
            ],
        )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"vision_config.vt_hidden_size ({self.hidden_size}) must be divisible by "
                f"vision_config.vt_num_attention_heads ({self.num_attention_heads})"
            )
        if self.head_dim % 4:
            raise ConfigError(f"vision_config: head dim {self.head_dim} must be a multiple of 4 for 2-D rope")
        if self.mm_hidden_size != self.hidden_size:
            raise ConfigError(
                f"vision_config.mm_hidden_size ({self.mm_hidden_size}) must equal "
                f"vision_config.vt_hidden_size ({self.hidden_size})"
            )


@dataclass(frozen=True)
class K25Config:
    """The whole model: text stack, optional vision tower, quantization and special token ids."""

    text: TextConfig
    vision: VisionConfig | None = None
    quantization: QuantConfig | None = None
    media_placeholder_token_id: int = 163605
    bos_token_id: int = 163584
    eos_token_id: int = 163585
    pad_token_id: int = 163839
    name: str = "custom"
    # Release file layout: "kimi_k25" (nested text/vision configs, "language_model." tensor prefix) or
    # "deepseek_v3" (a flat text-only config, no prefix).
    layout: str = "kimi_k25"

    def validate(self) -> K25Config:
        if self.layout not in ("kimi_k25", "deepseek_v3"):
            raise ConfigError(f"layout must be 'kimi_k25' or 'deepseek_v3', got {self.layout!r}")
        if self.layout == "deepseek_v3" and self.vision is not None:
            raise ConfigError("vision_config: a flat deepseek_v3 layout has no vision tower")
        self.text.validate()
        if self.vision is not None:
            self.vision.validate()
            if self.vision.text_hidden_size != self.text.hidden_size:
                raise ConfigError(
                    f"vision_config.text_hidden_size ({self.vision.text_hidden_size}) must equal "
                    f"text_config.hidden_size ({self.text.hidden_size})"
                )
        if self.quantization is not None:
            q = self.quantization
            if q.num_bits != 4 or not q.symmetric:
                raise ConfigError(
                    f"quantization_config: only symmetric 4-bit weights are supported, got "
                    f"num_bits={q.num_bits} symmetric={q.symmetric}"
                )
            if q.format != "pack-quantized":
                raise ConfigError(f"quantization_config.format: only 'pack-quantized' is supported, got {q.format!r}")
            if q.group_size <= 0 or q.group_size % 8:
                raise ConfigError(
                    f"quantization_config group_size must be a positive multiple of 8, got {q.group_size}"
                )
            for name in ("hidden_size", "moe_intermediate_size"):
                if getattr(self.text, name) % q.group_size:
                    raise ConfigError(
                        f"text_config.{name} ({getattr(self.text, name)}) must be a multiple of the "
                        f"quantization group size ({q.group_size})"
                    )
        return self

    def replace(self, **changes: Any) -> K25Config:
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------------------------------------
# Run settings
# --------------------------------------------------------------------------------------------------------

KERNELS = ("xla", "pallas", "pallas:gpu", "pallas:tpu")  # = pallas_kernels.dispatch.IMPLS
EXPERT_STRATEGIES = ("auto", "grouped", "tiled", "per_row")  # = pallas_kernels.grouped_swiglu.STRATEGIES
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
SHARDING_STRATEGIES = ("inference", "train")  # = the rules tables of k25jax.sharding


def _dtype_name(value: Any, field: str) -> str | None:
    """A dtype given as a name (``"bfloat16"``), a numpy/jax dtype or a scalar type -> its canonical name."""
    if value is None:
        return None
    import numpy as np

    try:
        import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

        name = np.dtype(value).name
    except TypeError:
        raise ConfigError(f"RunConfig.{field}: {value!r} is not a dtype") from None
    if name not in ("bfloat16", "float16", "float32", "float64"):
        raise ConfigError(f"RunConfig.{field}: {name} is not a float dtype (bfloat16, float16, float32, float64)")
    return name


@dataclass(frozen=True)
class RunConfig:
    """How a model runs, as opposed to what it is (:class:`K25Config`): given once to ``K25`` / ``build_model`` /
    ``abstract_model`` / ``load_model`` and held by the model as static structure.

    Attributes:
      compute_dtype: the matmul input dtype (norms, softmax, router and rope run in float32 whatever it is).
      param_dtype: how float parameters are stored (default: ``compute_dtype``); the MoE correction bias stays
        float32, INT4 experts stay packed.
      kernels: the INT4 matmul implementation: ``"xla"`` (dequantize, then XLA's dot), ``"pallas"`` (the Pallas
        kernel of the platform being lowered for; interpreted on CPU), ``"pallas:gpu"`` / ``"pallas:tpu"`` (that
        kernel whatever the platform). Only INT4 experts use it.
      experts: the routed-expert strategy of :func:`pallas_kernels.grouped_swiglu.grouped_swiglu`: ``"auto"``
        (chosen when lowering: CPU scans on CPU, grouped matmuls elsewhere) or one of ``"grouped"``, ``"tiled"``,
        ``"per_row"`` forced on every platform.
      remat: rematerialisation of the layer scans under differentiation: ``"none"``, ``"full"`` (save only each
        layer's input), ``"dots"`` (save matmul outputs), ``"dots_no_batch"`` (save matmuls without batch dims).
      cache_dtype: the latent cache dtype (default: ``compute_dtype``).
      sharding: the rules table parameters are placed by on a mesh (``"inference"`` or ``"train"``).
      attention_block: None (the plain full-form attention: ``[B, H, T, S]`` scores and a dense ``[B, T, S]``
        mask) or a block length in tokens: the full form over new tokens (training, uncached forward, cached
        prefill) and the absorbed form run blockwise with an online softmax (``k25jax.attention.blockwise_attention``;
        score memory of one ``[B, H, block, block]`` block, forward and backward).

    Dtypes may be given as names or dtypes; they are kept as names (``run.compute_dtype == "bfloat16"``) so the
    config is hashable and prints plainly; ``run.dtype(...)`` gives the dtype object.
    """

    compute_dtype: Any = "bfloat16"
    param_dtype: Any = None
    kernels: str = "xla"
    experts: str = "auto"
    remat: str = "none"
    cache_dtype: Any = None
    sharding: str = "inference"
    attention_block: int | None = None

    def __post_init__(self):
        for field in ("compute_dtype", "param_dtype", "cache_dtype"):
            object.__setattr__(self, field, _dtype_name(getattr(self, field), field))
        if self.compute_dtype is None:
            raise ConfigError("RunConfig.compute_dtype must be set")
        for field, allowed in (
            ("kernels", KERNELS),
            ("experts", EXPERT_STRATEGIES),
            ("remat", REMAT_POLICIES),
            ("sharding", SHARDING_STRATEGIES),
        ):
            if getattr(self, field) not in allowed:
                raise ConfigError(f"RunConfig.{field}: {getattr(self, field)!r} is not one of {allowed}")
        block = self.attention_block
        if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block <= 0):
            raise ConfigError(f"RunConfig.attention_block: {block!r} is not None or a positive int (tokens per block)")

    @staticmethod
    def dtype(name: str):
        """The numpy dtype object of a dtype name (bfloat16 through ml_dtypes)."""
        import numpy as np

        return np.dtype(name)

    @property
    def compute(self):
        """``compute_dtype`` as a dtype object."""
        return self.dtype(self.compute_dtype)

    @property
    def params(self):
        """``param_dtype`` (default: the compute dtype) as a dtype object."""
        return self.dtype(self.param_dtype or self.compute_dtype)

    @property
    def cache(self):
        """``cache_dtype`` (default: the compute dtype) as a dtype object."""
        return self.dtype(self.cache_dtype or self.compute_dtype)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """``0.1 * mscale * ln(factor) + 1`` for factor > 1, else 1 (architecture doc section 2.5)."""
    if factor <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def _positive(cfg: Any, prefix: str, names: list[str]) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{prefix}.{name} must be a positive number, got {value!r}")


# --------------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------------

K25_QUANT_IGNORE = ("lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*")


def k25() -> K25Config:
    """Full Kimi K2.5 (1.03T parameters, INT4 routed experts), as released."""
    text = TextConfig(
        vocab_size=163840,
        hidden_size=7168,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        num_hidden_layers=61,
        num_attention_heads=64,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=384,
        num_experts_per_tok=8,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.827,
        rms_norm_eps=1e-5,
        latent_norm_eps=1e-6,
        rope_theta=50000.0,
        rope_scaling=YarnRope(
            factor=64.0,
            original_max_position_embeddings=4096,
            beta_fast=32.0,
            beta_slow=1.0,
            mscale=1.0,
            mscale_all_dim=1.0,
        ),
        max_position_embeddings=262144,
    )
    return K25Config(
        text=text, vision=VisionConfig(), quantization=QuantConfig(ignore=K25_QUANT_IGNORE), name="k25"
    ).validate()


def k26() -> K25Config:
    """Kimi K2.6: the same architecture and layout as K2.5."""
    return k25().replace(name="k26")


TINY_VOCAB = 1280  # 1024 BPE ranks + 256 reserved specials, the layout of the embedded tiny tokenizer


def tiny() -> K25Config:
    """A tiny random-init model for tests and the embedded default (no download).

    Exercises every feature of the full model: one dense layer then MoE layers, group-limited routing,
    YaRN past the original context, v_head_dim != qk_nope_head_dim, INT4-compatible widths.
    """
    text = TextConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        q_lora_rank=48,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.827,
        rms_norm_eps=1e-5,
        latent_norm_eps=1e-6,
        rope_theta=50000.0,
        rope_scaling=YarnRope(
            factor=16.0,
            original_max_position_embeddings=64,
            beta_fast=32.0,
            beta_slow=1.0,
            mscale=1.0,
            mscale_all_dim=1.0,
        ),
        max_position_embeddings=1024,
    )
    vision = VisionConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=14,
        pos_emb_height=8,
        pos_emb_width=8,
        pos_emb_time=4,
        merge_kernel_size=(2, 2),
        mm_hidden_size=32,
        text_hidden_size=64,
    )
    special = TINY_VOCAB - 256
    return K25Config(
        text=text,
        vision=vision,
        quantization=QuantConfig(ignore=K25_QUANT_IGNORE),
        media_placeholder_token_id=special + 21,
        bos_token_id=special,
        eos_token_id=special + 1,
        pad_token_id=special + 255,
        name="tiny",
    ).validate()


PRESETS = {"k25": k25, "k26": k26, "tiny": tiny}


def preset(name: str) -> K25Config:
    """A named preset: ``k25``, ``k26`` or ``tiny``."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
