"""Config parsing: the release config.json as shipped, presets, and errors that name the field."""

import copy
import json
import os

import pytest

from k25jax.config import ConfigError, k25, preset, tiny
from k25jax.release.config import from_release_config, load_yaml, to_release_config

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def release_dict():
    """A config.json in the shape Moonshot ships it (rope_scaling with 'type', quantization at both levels)."""
    return to_release_config(k25())


def test_k25_release_config_values():
    cfg = from_release_config(release_dict())
    t = cfg.text
    assert (t.hidden_size, t.num_hidden_layers, t.n_routed_experts, t.num_experts_per_tok) == (7168, 61, 384, 8)
    assert t.qk_head_dim == 192 and t.latent_cache_dim == 576
    assert t.num_dense_layers == 1 and t.num_moe_layers == 60
    assert t.attention_scale == pytest.approx(0.144680, abs=1e-6)  # 192^-0.5 * 1.415888^2 (arch doc 2.5)
    assert cfg.vision.head_dim == 72 and cfg.vision.merged_dim == 4608
    assert cfg.quantization.group_size == 32 and cfg.quantization.num_bits == 4
    assert cfg.media_placeholder_token_id == 163605 and cfg.eos_token_id == 163585
    assert cfg == k25().replace(name=cfg.name)


SHIPPED = os.path.join(os.path.dirname(__file__), "data", "kimi_k25_config.json")


def shipped_dict():
    """tests/data/kimi_k25_config.json: K2.5's config.json as Moonshot ships it, written from the documented values
    (docs/k25-architecture.md section 1): both rope spellings, quantization at both levels with its observer and
    kv-cache fields, auto_map, the raw vt_* vision names, HF bookkeeping fields k25jax ignores."""
    with open(SHIPPED, encoding="utf-8") as f:
        return json.load(f)


def test_shipped_config_json_reads_as_the_k25_preset():
    d = shipped_dict()
    assert {"rope_scaling", "rope_parameters"} <= d["text_config"].keys() and "auto_map" in d
    assert d["quantization_config"]["config_groups"]["group_0"]["weights"]["observer_kwargs"] == {}
    cfg = from_release_config(SHIPPED)
    t, v, q = cfg.text, cfg.vision, cfg.quantization
    assert (t.vocab_size, t.hidden_size, t.intermediate_size, t.moe_intermediate_size) == (163840, 7168, 18432, 2048)
    assert (t.num_hidden_layers, t.num_dense_layers, t.num_moe_layers, t.num_attention_heads) == (61, 1, 60, 64)
    assert (t.q_lora_rank, t.kv_lora_rank, t.qk_nope_head_dim, t.qk_rope_head_dim, t.v_head_dim) == (
        1536,
        512,
        128,
        64,
        128,
    )
    assert (t.n_routed_experts, t.num_experts_per_tok, t.n_shared_experts, t.n_group, t.topk_group) == (384, 8, 1, 1, 1)
    assert t.norm_topk_prob is True and t.routed_scaling_factor == 2.827 and t.rms_norm_eps == 1e-5
    assert t.rope_theta == 50000.0 and t.max_position_embeddings == 262144
    y = t.rope_scaling
    assert (y.factor, y.original_max_position_embeddings, y.beta_fast, y.beta_slow, y.mscale, y.mscale_all_dim) == (
        64.0,
        4096,
        32.0,
        1.0,
        1.0,
        1.0,
    )
    assert t.attention_scale == pytest.approx(0.144680, abs=1e-6)
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size, v.patch_size) == (
        1152,
        27,
        16,
        4304,
        14,
    )
    assert (v.pos_emb_height, v.pos_emb_width, v.pos_emb_time, v.merge_kernel_size) == (64, 64, 4, (2, 2))
    assert (v.mm_hidden_size, v.text_hidden_size, v.projector_ln_eps, v.head_dim) == (1152, 7168, 1e-5, 72)
    assert (q.num_bits, q.group_size, q.symmetric, q.format) == (4, 32, True, "pack-quantized")
    assert q.ignore == (
        "lm_head",
        "re:.*self_attn.*",
        "re:.*shared_experts.*",
        r"re:.*mlp\.(gate|up|gate_up|down)_proj.*",
    )
    assert (cfg.media_placeholder_token_id, cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        163605,
        163584,
        163585,
        163839,
    )
    assert cfg.layout == "kimi_k25"
    k25_preset = preset("k25")
    assert (cfg.text, cfg.vision, cfg.quantization) == (k25_preset.text, k25_preset.vision, k25_preset.quantization)
    assert cfg == k25_preset.replace(name=cfg.name)


@pytest.mark.parametrize("keep", ["rope_scaling", "rope_parameters"])
def test_shipped_config_with_one_rope_spelling(keep):
    d = shipped_dict()
    d["text_config"].pop("rope_parameters" if keep == "rope_scaling" else "rope_scaling")
    if keep == "rope_parameters":
        del d["text_config"]["rope_theta"]  # transformers >= 5 keeps theta inside rope_parameters only
    assert from_release_config(d).text == k25().text


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: t["rope_parameters"].update(factor=32.0), "rope_scaling and rope_parameters disagree"),
        (lambda t: t["rope_parameters"].update(rope_theta=10000.0), "rope_scaling and rope_parameters disagree"),
        (lambda t: t["quantization_config"].update(kv_cache_scheme={"num_bits": 8}), "kv_cache_scheme"),
    ],
)
def test_shipped_config_inconsistencies_name_the_field(mutate, message):
    d = shipped_dict()
    mutate(d["text_config"])
    d.pop("quantization_config")  # so the text_config copy is the one read
    with pytest.raises(ConfigError, match=r"text_config(\.quantization_config)?[.:] ?" + message):
        from_release_config(d)


def test_rope_parameters_form_and_quant_inside_text_config():
    d = release_dict()
    rs = d["text_config"].pop("rope_scaling")
    rs.pop("type")
    d["text_config"]["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 50000.0, **rs}
    del d["text_config"]["rope_theta"]
    del d["quantization_config"]  # only inside text_config now
    cfg = from_release_config(d)
    assert cfg.text.rope_scaling == k25().text.rope_scaling
    assert cfg.text.rope_theta == 50000.0
    assert cfg.quantization == k25().quantization


def test_kimi_k2_model_type_and_flat_text_config():
    d = release_dict()
    d["text_config"]["model_type"] = "kimi_k2"
    assert from_release_config(d).text == k25().text
    flat = copy.deepcopy(release_dict()["text_config"])
    cfg = from_release_config(flat)
    assert cfg.layout == "deepseek_v3" and cfg.vision is None and cfg.text == k25().text


def test_reads_file_and_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(release_dict()))
    assert from_release_config(tmp_path).text == k25().text
    assert from_release_config(tmp_path / "config.json").text == k25().text


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d["text_config"].pop("hidden_size"), "text_config.hidden_size"),
        (lambda d: d["text_config"].pop("kv_lora_rank"), "text_config.kv_lora_rank"),
        (lambda d: d["vision_config"].pop("vt_hidden_size"), "vision_config.vt_hidden_size"),
        (lambda d: d["text_config"].update(n_group=5), "text_config.n_group"),
        (lambda d: d["text_config"].update(topk_group=2), "text_config.topk_group"),
        (lambda d: d["text_config"].update(scoring_func="softmax"), "text_config.scoring_func"),
        (lambda d: d["text_config"].update(hidden_size="7168"), "text_config.hidden_size"),
        (lambda d: d["text_config"]["rope_scaling"].update(type="linear"), "text_config.rope_scaling.rope_type"),
        (lambda d: d["text_config"]["rope_scaling"].pop("factor"), "text_config.rope_scaling.factor"),
        (
            lambda d: d["quantization_config"]["config_groups"]["group_0"]["weights"].update(num_bits=8),
            "quantization_config",
        ),
        (lambda d: d["quantization_config"].update(format="marlin-24"), "quantization_config.format"),
        (lambda d: d["quantization_config"]["config_groups"]["group_0"]["weights"].update(group_size=48), "group size"),
        (lambda d: d["vision_config"].update(text_hidden_size=4096), "vision_config.text_hidden_size"),
        (lambda d: d["vision_config"].update(vt_num_attention_heads=7), "vision_config.vt_hidden_size"),
        (lambda d: d.update(tie_word_embeddings=True), "tie_word_embeddings"),
    ],
)
def test_errors_name_the_field(mutate, field):
    d = release_dict()
    mutate(d)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        from_release_config(d)


def test_error_names_the_file(tmp_path):
    d = release_dict()
    del d["text_config"]["vocab_size"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=r"config\.json: text_config\.vocab_size is required"):
        from_release_config(tmp_path)
    with pytest.raises(ConfigError, match="config.json not found"):
        from_release_config(tmp_path / "nope")


@pytest.mark.parametrize("name", ["k25", "k26", "tiny"])
def test_yaml_presets_match_python_presets(name):
    """configs/*.yaml are written by k25jax.release.config.dump_yaml(preset(name), path); they must stay in sync."""
    assert load_yaml(os.path.join(CONFIGS, f"{name}.yaml")) == preset(name)


def test_tiny_round_trips_through_release_dict():
    assert from_release_config(to_release_config(tiny())) == tiny().replace(name="custom")


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'k3'"):
        preset("k3")
