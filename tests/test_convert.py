"""release -> orbax checkpoint -> model: exact, INT4 kept packed, plain orbax can restore it, and restores onto a
mesh place every expert slice on its device."""

import dataclasses
import json
import math
import os

import convert_helpers as helpers
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx, traverse_util

from convert.orbax_format import TMP_SUFFIX, choose_chunks
from convert.to_orbax import convert_release
from k25jax import abstract_model, load_model
from k25jax.checkpoint import CHECKPOINT_MARKER, restore_target
from k25jax.config import RunConfig
from k25jax.release.reader import ReleaseReader
from k25jax.sharding import make_mesh

import configs


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(cfg, release dir, checkpoint dir) for the tiny Kimi-K2.5 config (text + vision, INT4 experts)."""
    root = tmp_path_factory.mktemp("convert")
    cfg = configs.grouped()
    release = helpers.make_release(cfg, root / "release", seed=11)
    summary = convert_release(release, root / "ckpt", progress=False)
    assert summary["resumed_bytes"] == 0 and summary["converted_bytes"] == summary["source_bytes"]
    return cfg, release, str(root / "ckpt")


@pytest.fixture(scope="module")
def release_model(converted):
    return load_model(converted[1], RunConfig(compute_dtype=jnp.float32), progress=False)


def test_checkpoint_logits_equal_release_logits_exactly(converted, release_model):
    cfg, _, ckpt = converted
    restored = load_model(ckpt, RunConfig(compute_dtype=jnp.float32))
    nbytes = helpers.assert_same_params(release_model, restored)  # vision tower and projector included
    ids = jnp.asarray((np.arange(48).reshape(2, 24) * 37) % cfg.text.vocab_size)
    ours, ref = np.asarray(restored(ids)), np.asarray(release_model(ids))
    print(f"parameters compared bit for bit: {nbytes} bytes; max |logit diff| {np.abs(ours - ref).max()}")
    np.testing.assert_array_equal(ours, ref)


def test_checkpoint_keeps_release_dtypes_and_int4(converted):
    """INT4 experts stay int32 words + bf16 scales on disk and after restore; bias float32; the rest bf16."""
    cfg, release, ckpt = converted
    model = load_model(ckpt)  # default compute dtype bf16
    flat = helpers.flat_params(model)
    for path, value in flat.items():
        name = "/".join(path)
        want = {"packed": np.int32, "scales": jnp.bfloat16}.get(path[-1], jnp.bfloat16)
        if path[-1] == "correction_bias":
            want = np.float32
        assert value.dtype == np.dtype(want), name
    with open(os.path.join(ckpt, CHECKPOINT_MARKER)) as f:
        arrays = json.load(f)["arrays"]
    on_disk = sum(math.prod(a["shape"]) * np.dtype(jnp.dtype(a["dtype"])).itemsize for a in arrays.values())
    reader = ReleaseReader(release)
    in_release = sum(t.nbytes for n, t in reader.tensors.items() if not n.endswith("weight_shape"))
    print(f"checkpoint array bytes {on_disk}, release tensor bytes (less weight_shape) {in_release}")
    assert on_disk == in_release  # nothing expanded: INT4 stays 0.5625 bytes per expert value
    expert_values = (
        3
        * cfg.text.num_moe_layers
        * cfg.text.n_routed_experts
        * cfg.text.hidden_size
        * (cfg.text.moe_intermediate_size)
    )
    expert_bytes = sum(v.nbytes for p, v in flat.items() if p[-1] in ("packed", "scales"))
    assert expert_bytes / expert_values == pytest.approx(0.5625)


@pytest.fixture(scope="module")
def release_bytes(converted):
    """``{leaf path: bf16-model array}`` of the release loaded directly (bf16, INT4 words + scales, f32 bias)."""
    return helpers.flat_params(load_model(converted[1], progress=False))


@pytest.mark.parametrize("api", ["StandardCheckpointer", "PyTreeCheckpointer", "PyTreeCheckpointer, no target"])
def test_plain_orbax_restores_the_checkpoint(converted, release_bytes, api):
    """No k25jax loader: orbax's own public checkpointers read the hand-written layout (convert/orbax_format.py),
    with a target of ShapeDtypeStructs carrying shardings or, with no target, from orbax's own metadata as numpy;
    every array equals what loading the release gives, dtype and bytes."""
    cfg, _, ckpt = converted
    mesh = make_mesh(expert=8)
    target = restore_target(abstract_model(cfg), mesh)  # the pure-dict tree, bf16, NamedShardings
    if api == "StandardCheckpointer":
        restored = ocp.StandardCheckpointer().restore(ckpt, target)
    elif api == "PyTreeCheckpointer":
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        restored = ocp.PyTreeCheckpointer().restore(
            ckpt, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args)
        )
    else:
        checkpointer = ocp.PyTreeCheckpointer()
        tree = checkpointer.metadata(ckpt).item_metadata.tree
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        restored = checkpointer.restore(ckpt, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    got = traverse_util.flatten_dict(restored)
    assert got.keys() == release_bytes.keys()
    if api != "PyTreeCheckpointer, no target":
        packed = restored["text"]["moe_layers"]["mlp"]["experts"]["down_proj"]["packed"]
        assert packed.sharding == target["text"]["moe_layers"]["mlp"]["experts"]["down_proj"]["packed"].sharding
    nbytes = 0
    for path, value in got.items():
        value, want = np.asarray(value), release_bytes[path]
        assert (value.dtype, value.shape) == (want.dtype, want.shape), "/".join(path)
        assert value.tobytes() == want.tobytes(), "/".join(path)
        nbytes += value.nbytes
    assert {str(v.dtype) for v in got.values()} == {"bfloat16", "int32", "float32"}
    print(f"{api}: {len(got)} arrays, {nbytes} bytes equal to the release's")


EXPERT_ARRAYS = [
    ("text", "moe_layers", "mlp", "experts", w, part)
    for w in ("gate_proj", "up_proj", "down_proj")
    for part in ("packed", "scales")
]


def _check_expert_placement(model, reference, mesh, experts_per_device: int) -> int:
    """Each device holds exactly its slice of every stacked expert array, equal to the reference's slice."""
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    ref = helpers.flat_params(reference)
    checked = 0
    for path in EXPERT_ARRAYS:
        array = flat[path].get_value()
        assert array.sharding.mesh.shape == mesh.shape
        devices = set()
        for shard in array.addressable_shards:
            index = shard.index
            experts = index[1]
            assert experts.stop - experts.start == experts_per_device
            expected_devices = array.sharding.devices_indices_map(array.shape)
            assert expected_devices[shard.device] == index
            np.testing.assert_array_equal(np.asarray(shard.data), ref[path][index], "/".join(path))
            devices.add(shard.device)
            checked += 1
        assert len(devices) == len(jax.devices())
    return checked


@pytest.mark.parametrize("axes", [{"expert": 8}, {"expert": 4, "data": 2}])
def test_restore_onto_mesh_places_each_expert_slice(converted, release_model, axes):
    cfg, release, ckpt = converted
    mesh = make_mesh(**axes)
    experts_per_device = cfg.text.n_routed_experts // axes["expert"]
    from_ckpt = load_model(ckpt, RunConfig(compute_dtype=jnp.float32), mesh=mesh)
    from_release = load_model(release, RunConfig(compute_dtype=jnp.float32), mesh=mesh, progress=False)
    n = _check_expert_placement(from_ckpt, release_model, mesh, experts_per_device)
    n += _check_expert_placement(from_release, release_model, mesh, experts_per_device)
    print(f"mesh {axes}: {n} device shards checked, {experts_per_device} experts per device")
    helpers.assert_same_params(from_ckpt, release_model)
    helpers.assert_same_params(from_release, release_model)
    ids = jnp.asarray((np.arange(32).reshape(2, 16) * 29) % cfg.text.vocab_size)
    ref = np.asarray(release_model(ids))
    for model in (from_ckpt, from_release):
        got = np.asarray(model(ids))
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


class _RecordingBar:
    """Stands in for tqdm: records the total and the updates."""

    bars: list = []

    def __init__(self, total=None, desc=None, disable=False, **_):
        self.total, self.desc, self.done = total, desc, 0
        _RecordingBar.bars.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n):
        self.done += n


@pytest.mark.parametrize("source", ["checkpoint", "release"])
def test_mesh_loads_report_progress_in_bytes(converted, release_model, monkeypatch, source):
    """Onto a mesh, the progress bar counts the bytes this process reads, each distinct shard once; the checkpoint
    is restored in several orbax partial restores (group size forced small) and is still exact."""
    import tqdm.auto

    from k25jax import checkpoint

    cfg, release, ckpt = converted
    monkeypatch.setattr(tqdm.auto, "tqdm", _RecordingBar)
    monkeypatch.setattr("k25jax.release.loader.tqdm", _RecordingBar)
    monkeypatch.setattr(checkpoint, "RESTORE_GROUP_BYTES", 256 << 10)
    restores = []
    original = ocp.Checkpointer.restore
    monkeypatch.setattr(
        ocp.Checkpointer, "restore", lambda self, *a, **k: restores.append(1) or original(self, *a, **k)
    )
    _RecordingBar.bars = []
    mesh = make_mesh(expert=4, data=2)  # experts split 4 ways, replicated over data: those replicas are read once
    model = load_model(ckpt if source == "checkpoint" else release, RunConfig(compute_dtype=jnp.float32), mesh=mesh)
    helpers.assert_same_params(model, release_model)
    [bar] = [b for b in _RecordingBar.bars if b.desc in ("restore", "load release")]
    # one process holds every shard of every array here: the distinct shards add up to each array once
    expected = sum(v.nbytes for _, v in nnx.to_flat_state(nnx.state(model)))
    assert bar.total == bar.done == expected
    if source == "checkpoint":
        assert len(restores) > 3  # grouped partial restores
        print(f"{len(restores)} partial restores, {expected} bytes")


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="reads /proc/self/io (Linux)")
def test_restore_bar_moves_while_a_group_is_read(tmp_path):
    """Within one restore group (one 169 GB expert array for K2.5) the bar follows the bytes read so far."""
    import time

    from k25jax.checkpoint import _ReadTicker

    data = tmp_path / "blob"
    data.write_bytes(os.urandom(4 << 20))
    bar = _RecordingBar(total=8 << 20)
    with _ReadTicker(bar, 8 << 20, interval=0.01):
        with open(data, "rb", buffering=0) as f:
            while f.read(1 << 20):
                pass
        deadline = time.time() + 5
        while bar.done < 4 << 20 and time.time() < deadline:
            time.sleep(0.01)
        during = bar.done
    assert 4 << 20 <= during < 8 << 20  # followed the 4 MiB read, held back the rest
    assert bar.done == 8 << 20  # completed exactly when the group returned


def test_release_onto_mesh_reads_each_slice_once(converted, monkeypatch):
    """Streaming a release onto a mesh reads each expert tensor once and replicated tensors once, not per device."""
    cfg, release, _ = converted
    calls = []
    original = ReleaseReader.read

    def counting(self, name, rows=None, buffer=None):
        calls.append((name, rows))
        return original(self, name, rows, buffer)

    monkeypatch.setattr(ReleaseReader, "read", counting)
    load_model(release, mesh=make_mesh(expert=8), progress=False)
    experts = [c for c in calls if ".experts." in c[0]]
    expert_tensors = 3 * 3 * cfg.text.num_moe_layers * cfg.text.n_routed_experts  # packed, scale, shape
    assert len(experts) == expert_tensors and len(set(experts)) == expert_tensors
    embed = [c for c in calls if c[0].endswith("embed_tokens.weight")]
    assert len(embed) == 1  # replicated over 8 devices, read once


def test_choose_chunks_splits_shardable_dims_first():
    # K2.5's lm_head [7168, 163840] bf16: the vocabulary (sharded over "tensor") is split, the model width kept
    assert choose_chunks((7168, 163840), jnp.bfloat16, 0, ("embed", "vocab")) == (7168, 640)
    # an INT4 expert slot of K2.5 [60, 384, 896, 2048] int32 is one 7.3 MB chunk per (layer, expert)
    assert choose_chunks((60, 384, 896, 2048), np.int32, 2, ("layers", "experts", "expert_embed", "expert_mlp")) == (
        1,
        1,
        896,
        2048,
    )
    # o_proj [61, 64, 128, 7168]: heads (sharded) split before the model width
    assert choose_chunks((61, 64, 128, 7168), jnp.bfloat16, 1, ("layers", "heads", "head_dim", "embed")) == (
        1,
        8,
        128,
        7168,
    )


def test_no_temporary_files_left(converted):
    _, _, ckpt = converted
    leftovers = [p for p in helpers.tree_files(ckpt) if p.endswith(TMP_SUFFIX) or ".k25jax-" in p]
    assert leftovers == []


def test_text_only_release_converts(tmp_path):
    cfg = dataclasses.replace(configs.k25_like(), vision=None)
    release = helpers.make_release(cfg, tmp_path / "release", vision=False, num_shards=2)
    convert_release(release, tmp_path / "ckpt", progress=False)
    a = load_model(release, RunConfig(compute_dtype=jnp.float32), progress=False)
    b = load_model(tmp_path / "ckpt", RunConfig(compute_dtype=jnp.float32))
    helpers.assert_same_params(a, b)


def test_tensor_parallel_restore_reads_partial_slices(tmp_path, monkeypatch):
    """expert=4 x tensor=2 (expert width 64: two INT4 groups along K of down_proj): INT4 words and scales split
    along the expert width, the vocabulary split too; streamed from a release, lm_head rows are read per shard."""
    cfg = configs.text_variant(configs.grouped(), moe_intermediate_size=64)
    release = helpers.make_release(cfg, tmp_path / "release", seed=13)
    convert_release(release, tmp_path / "ckpt", progress=False)
    reference = load_model(release, RunConfig(compute_dtype=jnp.float32), progress=False)
    mesh = make_mesh(expert=4, tensor=2)
    calls = []
    original = ReleaseReader.read

    def counting(self, name, rows=None, buffer=None):
        calls.append((name, rows))
        return original(self, name, rows, buffer)

    monkeypatch.setattr(ReleaseReader, "read", counting)
    from_release = load_model(release, RunConfig(compute_dtype=jnp.float32), mesh=mesh, progress=False)
    monkeypatch.undo()
    from_ckpt = load_model(tmp_path / "ckpt", RunConfig(compute_dtype=jnp.float32), mesh=mesh)
    for model in (from_release, from_ckpt):
        helpers.assert_same_params(model, reference)
        down = model.text.moe_layers.mlp.experts.down_proj.packed[...]
        assert down.sharding.spec[1:3] == ("expert", "tensor")
        assert {s.data.shape for s in down.addressable_shards} == {(2, 2, 4, 64)}  # [L, E/4, (F/8)/2, D]
    head_rows = sorted(r for n, r in calls if n.endswith("lm_head.weight"))
    assert head_rows == [(0, 640), (640, 1280)]  # each vocabulary half read once, by rows
