"""Sharded on 8 simulated CPU devices == one device; partitioner errors."""

import dataclasses

import jax
import numpy as np
import pytest

from olmax import models, network, optim, partitioning, plan, trainer

CFG = network.OlmaxConfig(vocab_size=128, features=32, depth=2, max_length=32, conv_features=64, conv_kernel=3,
                          mixer_block=8, mixer_heads=4, num_heads=4, num_experts=4, expert_features=32,
                          capacity_factor=2.0, blocks=("conv", "moe", "mixer"))


def _losses(mesh_shape, steps=3, cfg=CFG):
    devices = jax.devices() if mesh_shape else jax.devices()[:1]
    partitioner = partitioning.PjitPartitioner(mesh_shape=mesh_shape, devices=devices)
    model = models.DecoderOnlyLM(network.Olmax(cfg))
    factory = lambda axes: optim.create_optimizer(learning_rate=1e-2, warmup_steps=1, total_steps=10, axes=axes)
    setup = trainer.TrainSetup(model, partitioner, (8, 32), factory)
    state = setup.init_state()
    step = trainer.make_steps(setup).train
    # One fixed batch: its loss must fall (random tokens, new each step, leave little to learn).
    tokens = np.random.RandomState(0).randint(1, CFG.vocab_size, (8, 33)).astype(np.int32)
    batch = {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
             "decoder_loss_weights": np.ones((8, 32), np.float32)}
    losses = []
    for _ in range(steps):
        with partitioner.activate():
            state, metrics = step(state, partitioner.global_batch(batch))
        losses.append(float(metrics["loss"]))
    sharding = jax.tree.leaves(state["params"])[0].sharding
    return np.array(losses), state, sharding


@pytest.fixture(scope="module")
def single():
    return _losses(None)


@pytest.mark.parametrize("mesh_shape", [{"data": 4, "model": 2}, {"data": 8, "model": 1}])
def test_sharded_losses_equal_single_device(single, mesh_shape):
    assert jax.device_count() == 8
    ref, ref_state, _ = single
    losses, state, _ = _losses(mesh_shape)
    np.testing.assert_allclose(losses, ref, rtol=2e-5)
    assert losses[-1] < losses[0]
    if mesh_shape["model"] > 1:  # parameters really are split over `model`
        wi = state["params"]["decoder"]["layers"]["conv_0"]["conv"]["wi"]
        assert wi.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "model")
        assert len(wi.addressable_shards) == 8 and wi.addressable_shards[0].data.shape[-1] == CFG.conv_features // 2


def test_gradients_reduced_once_a_step_train_the_same(single):
    """reduce_chunk_grads_once (one copy of the chunked weights per data shard) changes where the
    gradient is summed, not what: rows of 4 recall chunks and 4 conv chunks train as on one device."""
    cfg = dataclasses.replace(CFG, recall_chunk=8, conv_chunk=8, reduce_chunk_grads_once=True)
    ref, _, _ = single
    losses, _, _ = _losses({"data": 4, "model": 2}, cfg=cfg)
    np.testing.assert_allclose(losses, ref, rtol=2e-5)


def test_partitioner_errors():
    with pytest.raises(ValueError, match="divisible by the data-parallel size 4"):
        partitioning.PjitPartitioner(num_partitions=2).check_batch_size(6)
    with pytest.raises(ValueError, match="must divide the number of devices"):
        partitioning.PjitPartitioner(num_partitions=3)


def _step_collectives(mixer: str) -> dict[str, tuple[int, int]]:
    cfg = network.OlmaxConfig(vocab_size=256, features=256, depth=1, max_length=256, conv_features=256, num_heads=4,
                              mixer=mixer)
    partitioner = partitioning.PjitPartitioner(mesh_shape={"data": 2, "model": 4}, devices=jax.devices())
    return plan.plan(models.DecoderOnlyLM(network.Olmax(cfg)), partitioner, batch_size=2, length=256,
                     cost=False).collectives


def test_recall_mixer_splits_by_heads_like_attention():
    """Tensor parallel on data=2 x model=4: the recall mixer's projections split by head, so its
    compiled train step reshuffles nothing (no collective-permute or all-to-all: a concatenated
    [embed, 3d + ...] kernel used to need 60) and moves no more bytes than attention's."""
    ours, theirs = _step_collectives("recall"), _step_collectives("attention")
    assert theirs.get("all-reduce", (0, 0))[1] > 0  # the gradient all-reduce is found: the parser reads the HLO
    assert not {"collective-permute", "all-to-all"} & set(ours), ours
    assert sum(b for _, b in ours.values()) <= sum(b for _, b in theirs.values()), (ours, theirs)
