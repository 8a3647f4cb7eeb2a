"""Dense-to-sparse methods: gradual magnitude pruning (GMP) and AC/DC.

The hooks are driven by hand in the trainer's order on a tiny MLP, and the masks, weights and
optimizer state are checked against direct computation after every event.
"""

import copy
import io
import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from sparse_bench.confdir import conf_dir
from sparse_bench.errors import ConfigError
from sparse_bench.sparsity.methods import MethodContext, build_method
from sparse_bench.sparsity.methods.acdc import acdc_phases
from sparse_bench.train.trainer import hooked_step

from conftest import cli_here, read_jsonl

CONF = conf_dir() / "method"
SPE = 4  # steps per epoch


def E(value):
    """A milestone in epochs (of the base schedule)."""
    return {"unit": "epoch", "value": value}


def S(value):
    """A milestone in optimizer steps."""
    return {"unit": "step", "value": value}


# tiny models and tensors: one intra-op thread (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def make(name, density=0.1, epochs=10, multiplier=1.0, seed=0, wide_first=False, lr=0.05, **over):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 40), nn.ReLU(), nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 5))
    if wide_first:  # layers at very different scales: global and per-layer ranking must disagree
        with torch.no_grad():
            model[0].weight.mul_(10.0)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    cfg = OmegaConf.merge(OmegaConf.load(CONF / f"{name}.yaml"), OmegaConf.create(over))
    ctx = MethodContext(model=model, optimizer=opt, density=density, epochs=epochs, steps_per_epoch=SPE,
                        device=torch.device("cpu"), generator=torch.Generator().manual_seed(seed + 1),
                        loss_fn=nn.CrossEntropyLoss(), multiplier=multiplier)
    return model, opt, build_method(cfg, ctx)


g = torch.Generator().manual_seed(123)
X = torch.randn(64, 20, generator=g)
Y = (X @ torch.randn(20, 5, generator=g)).argmax(1)  # learnable labels


def loss_of(model):
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(X), Y))


def train(model, opt, m, first_epoch, last_epoch, before_epoch_end=None, after_epoch_end=None,
          after_step=None, before_step_end=None):
    """Epochs first_epoch..last_epoch (1-based) in the trainer's hook order.

    ``before_epoch_end(epoch)`` runs before the epoch's last ``on_step_end`` (where an event
    ending at that epoch fires) and ``after_epoch_end(epoch, logs)`` after ``on_epoch_end`` with
    the logs of both merged, as the trainer merges them into the epoch's record.
    """
    step = (first_epoch - 1) * SPE
    for epoch in range(first_epoch, last_epoch + 1):
        record = {}
        for i in range(SPE):
            hooked_step(m, opt, step, lambda: nn.functional.cross_entropy(model(X), Y))
            step += 1
            if before_step_end:
                before_step_end(step)
            if before_epoch_end and i == SPE - 1:
                before_epoch_end(epoch)
            logs = m.on_step_end(step)
            if logs:
                record.update(logs)
            if after_step:
                after_step(epoch, step, logs)
        logs = m.on_epoch_end(epoch, step)
        if logs:
            record.update(logs)
        if after_epoch_end:
            after_epoch_end(epoch, record or None)


def snapshot(m):
    return [p.detach().clone() for p in m.masks.params], [k.clone() for k in m.masks.masks]


def cubic(t, t0, t1, s_i, s_f):
    return s_f - (s_f - s_i) * (1 - (t - t0) / (t1 - t0)) ** 3


def one_global_threshold(w_old, m_old, new):
    """A global magnitude event: one threshold shared by all layers, except that no layer is
    emptied (prunable.allow_empty: false): a layer the threshold would empty keeps its largest."""
    assert all(int(k.sum()) >= 1 for k in new), "no layer is emptied"
    pruned = [o & ~n for o, n in zip(m_old, new)]
    max_pruned = max(float(w[d].abs().max()) for w, d in zip(w_old, pruned) if d.any())
    min_kept = min(float(w[k].abs().min()) for w, k in zip(w_old, new) if int(k.sum()) > 1)
    assert max_pruned <= min_kept
    for w, o, k in zip(w_old, m_old, new):
        if int(k.sum()) == 1:
            assert float(w[k].abs().max()) == float(w[o].abs().max())


# --- GMP -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_gmp_hits_the_cubic_schedule_at_every_event_and_never_regrows(scope):
    density, s_i = 0.1, 0.2
    model, opt, m = make("gmp", density=density, epochs=10, start=E(2), end=E(8), frequency=E(2),
                         initial_sparsity=s_i, scope=scope, wide_first=True)
    assert m.setup() is not None
    assert all(bool(k.all()) for k in m.masks.masks), "a fresh GMP run starts dense"
    total = sum(m.masks.numels)
    seen, before = {}, {}

    def pre(epoch):
        before["w"], before["m"] = snapshot(m)

    def post(epoch, logs):
        w_old, m_old = before["w"], before["m"]
        new = m.masks.masks
        for o, n in zip(m_old, new):
            assert not torch.any(n & ~o), "pruned weights never return"
        if epoch not in (2, 4, 6, 8):
            assert logs is None
            assert all(torch.equal(o, n) for o, n in zip(m_old, new))
            return
        s = cubic(epoch * SPE, 2 * SPE, 8 * SPE, s_i, 1 - density)
        want = round(density * total) if epoch == 8 else round((1 - s) * total)
        got = sum(m.masks.nnz())
        assert got == want, (epoch, got, want)
        assert logs["gmp/target_density"] == pytest.approx(want / total)
        assert logs["density/achieved"] == got / total
        assert "mask/pruned" in logs and "mask/change_pct" in logs
        for p, k in zip(m.masks.params, new):
            assert torch.all(p[~k] == 0)
        pruned = [o & ~n for o, n in zip(m_old, new)]
        if scope == "global":
            one_global_threshold(w_old, m_old, new)
        else:  # every layer at s(t), within one weight; ranking inside each layer
            for w, d, k, n in zip(w_old, pruned, new, m.masks.numels):
                assert abs(int(k.sum()) - (1 - s) * n) < 1.0 or epoch == 8
                if d.any() and k.any():
                    assert float(w[d].abs().max()) <= float(w[k].abs().min())
        seen[epoch] = [float(k.float().mean()) for k in new]

    train(model, opt, m, 1, 10, before_epoch_end=pre, after_epoch_end=post)
    assert sorted(seen) == [2, 4, 6, 8]
    assert sum(m.masks.nnz()) == round(density * total)
    final = seen[8]
    if scope == "layer":
        assert max(final) - min(final) < 2.0 / min(m.masks.numels)
    else:  # the 10x-scaled first layer keeps far more than its share under one threshold
        assert final[0] > 2 * density


def test_gmp_ranks_only_active_weights():
    """Large values written into pruned slots must not bring them back at the next event."""
    model, opt, m = make("gmp", density=0.2, epochs=6, start=E(1), end=E(5), frequency=E(2), scope="global")
    m.setup()
    poisoned = {}

    def pre(epoch):
        if epoch == 3:
            with torch.no_grad():
                for p, k in zip(m.masks.params, m.masks.masks):
                    p[~k] = 1e3  # as if a pruned weight had drifted far away
            poisoned["masks"] = [k.clone() for k in m.masks.masks]

    def post(epoch, logs):
        if epoch == 3:
            for old, new in zip(poisoned["masks"], m.masks.masks):
                assert not torch.any(new & ~old)

    # initial_sparsity > 0 so the first event (epoch 1) already prunes
    m.initial_sparsity = 0.3
    train(model, opt, m, 1, 6, before_epoch_end=pre, after_epoch_end=post)
    assert "masks" in poisoned and sum(m.masks.nnz()) == round(0.2 * sum(m.masks.numels))


def test_gmp_step_unit_events():
    model, opt, m = make("gmp", density=0.25, epochs=4, start=S(3), end=S(15), frequency=S(4))
    assert m.events == [3, 7, 11, 15]
    m.setup()
    total = sum(m.masks.numels)
    hits = []

    def after(epoch, step, logs):
        if step in (3, 7, 11, 15):
            s = cubic(step, 3, 15, 0.0, 0.75)
            want = round(0.25 * total) if step == 15 else round((1 - s) * total)
            assert sum(m.masks.nnz()) == want and logs["gmp/event"] == step
            hits.append(step)
        else:
            assert logs is None

    train(model, opt, m, 1, 4, after_step=after)
    assert hits == [3, 7, 11, 15]


def test_gmp_milestones_defaults_and_multiplier():
    # defaults: start at 10%, end at 80% of the run, every 2% (ResNet-50: 10..80 of 100 every 2 epochs)
    _, _, m = make("gmp", epochs=100)
    assert (m.start, m.end, m.frequency) == (10 * SPE, 80 * SPE, 2 * SPE)
    assert m.events == list(range(10 * SPE, 80 * SPE + 1, 2 * SPE))
    # the same fractions fit a 4-epoch run (16 steps): start 2, end 13, an event every step
    _, _, m = make("gmp", epochs=4)
    assert (m.start, m.end, m.frequency) == (2, 13, 1)
    # explicit milestones in epochs of the 1x schedule scale with the multiplier
    _, _, m = make("gmp", epochs=200, multiplier=2.0, start=E(10), end=E(80))
    assert (m.start, m.end) == (20 * SPE, 160 * SPE)
    # end is always an event even when the frequency does not divide the span
    _, _, m = make("gmp", epochs=10, start=E(1), end=E(6), frequency=E(2))
    assert m.events == [SPE, 3 * SPE, 5 * SPE, 6 * SPE]
    with pytest.raises(ConfigError, match="method.end"):
        make("gmp", epochs=10, start=E(2), end=E(20))
    with pytest.raises(ConfigError, match="method.start"):
        make("gmp", epochs=10, start=2)  # a bare number: fraction or epoch?
    with pytest.raises(ConfigError, match="method.scope"):
        make("gmp", scope="bogus")
    with pytest.raises(ConfigError, match="method.initial_sparsity"):
        make("gmp", density=0.5, initial_sparsity=0.9)


# --- AC/DC ---------------------------------------------------------------------------------------
RESNET50_100 = [
    (0, 10, "dense"), (10, 15, "sparse"), (15, 20, "dense"), (20, 25, "sparse"), (25, 30, "dense"),
    (30, 35, "sparse"), (35, 40, "dense"), (40, 45, "sparse"), (45, 50, "dense"), (50, 55, "sparse"),
    (55, 60, "dense"), (60, 65, "sparse"), (65, 70, "dense"), (70, 75, "sparse"), (75, 85, "dense"),
    (85, 100, "sparse"),
]


def in_steps(phases):
    return [(s * SPE, e * SPE, k) for s, e, k in phases]


def test_acdc_phases_match_the_reference_pattern():
    assert acdc_phases(100) == RESNET50_100
    assert acdc_phases(100, warmup=10, phase_length=5, final_dense=10, final_sparse=15) == RESNET50_100
    # fixed lengths on 200 epochs = the reference's 200-epoch config: prune at 10..170 and 185,
    # restore at 15..165 and 175
    ph = acdc_phases(200)
    assert [s for s, _, k in ph if k == "sparse"] == list(range(10, 171, 10)) + [185]
    assert [s for s, _, k in ph if k == "dense" and s > 0] == list(range(15, 166, 10)) + [175]
    assert ph[-1] == (185, 200, "sparse")
    # the method's defaults are the 100-epoch pattern as fractions of the run, in steps
    _, _, m = make("acdc", epochs=100)
    assert m.phases == in_steps(RESNET50_100)
    # schedule.multiplier=2 with the fractions: every boundary doubles
    _, _, m = make("acdc", epochs=200, multiplier=2.0)
    assert m.phases == in_steps([(2 * s, 2 * e, k) for s, e, k in RESNET50_100])
    # epoch lengths on a 200-epoch schedule: the reference's 200-epoch configuration
    _, _, m = make("acdc", epochs=200, warmup=E(10), phase_length=E(5), final_dense=E(10), final_sparse=E(15))
    assert m.phases == in_steps(ph)
    # the fractions fit a 4-epoch run (16 steps) too
    _, _, m = make("acdc", epochs=4)
    assert m.phases[0] == (0, 2, "dense") and m.phases[-1] == (14, 16, "sparse")
    with pytest.raises(ConfigError, match="method.warmup"):  # the 100-epoch pattern in epochs on 6 epochs
        make("acdc", epochs=6, warmup=E(10), phase_length=E(5), final_dense=E(10), final_sparse=E(15))


SMALL = dict(warmup=E(2), phase_length=E(1), final_dense=E(2), final_sparse=E(3))
SMALL_KINDS = ["dense", "dense", "sparse", "dense", "sparse", "dense", "dense", "sparse", "sparse", "sparse"]


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_acdc_dense_and_sparse_phases_drive_the_masks(scope):
    density = 0.15
    model, opt, m = make("acdc", density=density, epochs=10, scope=scope, wide_first=True, **SMALL)
    assert [m.phase(e * SPE) for e in range(10)] == SMALL_KINDS
    m.setup()
    total = sum(m.masks.numels)
    target = round(density * total)
    before = {}
    phase_masks = {}

    def after_step(epoch, step, logs):
        kind = SMALL_KINDS[min(step // SPE, 9)]  # the phase of the next step (a transition just ran)
        nnz = sum(m.masks.nnz())
        if kind == "dense":
            assert nnz == total, "masks are all True in dense phases"
            if not logs:  # (restored weights come back at 0: they train from the next step on)
                assert sum(int((p != 0).sum()) for p in m.masks.params) > target
        else:
            assert nnz == target, "exactly the target density in sparse phases"
            for p, k in zip(m.masks.params, m.masks.masks):
                assert torch.all(p[~k] == 0)
            # the mask is fixed for the whole sparse phase
            key = next(s // SPE for s, e, k in m.phases if s <= min(step, 10 * SPE - 1) < e)
            phase_masks.setdefault(key, [k.clone() for k in m.masks.masks])
            assert all(torch.equal(a, b) for a, b in zip(phase_masks[key], m.masks.masks))

    def pre(epoch):
        if epoch == 4:  # weights pruned in the first sparse phase grew large while dense
            with torch.no_grad():
                for p, k in zip(m.masks.params, phase_masks[2]):
                    p[~k] = torch.where(torch.rand(p.shape, generator=g) < 0.05, 50.0, 0.0)[~k]
        before["w"], before["m"] = snapshot(m)

    def post(epoch, logs):
        assert logs["acdc/sparse_phase"] == (1.0 if epoch < 10 and SMALL_KINDS[epoch] == "sparse" else
                                             float(epoch == 10))
        if epoch in (2, 4, 7):  # compression: magnitude mask from the current dense weights
            assert all(bool(k.all()) for k in before["m"])
            assert logs["acdc/compress"] == 1.0 and logs["density/achieved"] == target / total
            new = m.masks.masks
            if scope == "global":
                one_global_threshold(before["w"], before["m"], new)
            else:
                for w, k, n in zip(before["w"], new, m.masks.numels):
                    assert abs(int(k.sum()) - density * n) < 1.0
                    assert float(w[~k].abs().max()) <= float(w[k].abs().min())
        elif epoch in (3, 5):
            assert logs["acdc/compress"] == 0.0 and logs["density/achieved"] == 1.0
        else:
            assert "acdc/event" not in logs

    train(model, opt, m, 1, 10, before_epoch_end=pre, after_epoch_end=post, after_step=after_step)
    assert sum(m.masks.nnz()) == target
    assert sum(int((p != 0).sum()) for p in m.masks.params) <= target
    assert len(phase_masks) == 3
    # each sparse phase's mask comes from the weights trained densely in between: the slots made
    # large before the second compression are kept there
    assert any(torch.any(b & ~a) for a, b in zip(phase_masks[2], phase_masks[4]))


@pytest.mark.parametrize("mode", ["all", "restored", "none"])
def test_acdc_decompression_restores_zeros_and_resets_momentum(mode):
    model, opt, m = make("acdc", density=0.2, epochs=10, momentum_reset=mode, **SMALL)
    m.setup()
    state = {}

    def pre(epoch):
        if epoch == 3:
            state["masks"] = [k.clone() for k in m.masks.masks]
            state["mom"] = [opt.state[p]["momentum_buffer"].clone() for p in m.masks.params]
            state["bias_mom"] = opt.state[model[0].bias]["momentum_buffer"].clone()

    def post(epoch, logs):
        if epoch != 3:
            return
        assert all(bool(k.all()) for k in m.masks.masks), "decompressed: every weight trainable"
        for p, old, mom_before in zip(m.masks.params, state["masks"], state["mom"]):
            mom = opt.state[p]["momentum_buffer"]
            assert torch.all(p[~old] == 0), "restored weights come back at exactly 0"
            if mode == "none":
                assert torch.equal(mom, mom_before)
            else:
                assert torch.all(mom[~old] == 0), "momentum of restored weights is reset"
            if mode == "restored":
                assert torch.equal(mom[old], mom_before[old])
            if mode == "all":
                assert torch.all(mom == 0)
        bias_mom = opt.state[model[0].bias]["momentum_buffer"]
        assert torch.all(bias_mom == 0) if mode == "all" else torch.equal(bias_mom, state["bias_mom"])
        state["checked"] = True

    train(model, opt, m, 1, 3, before_epoch_end=pre, after_epoch_end=post)
    assert state.get("checked")
    if mode == "none":  # masked gradients decay the momentum but do not zero it: the reset does
        assert any(torch.any(mom[~old] != 0) for mom, old in zip(state["mom"], state["masks"]))
    # restored weights train again in the next (dense) epoch

    def dense_epoch_done(epoch):
        state["trained"] = all(torch.any(p[~old] != 0) for p, old in zip(m.masks.params, state["masks"]))

    train(model, opt, m, 4, 4, before_epoch_end=dense_epoch_done)
    assert state["trained"]


def test_acdc_starting_sparse_compresses_at_setup():
    model, opt, m = make("acdc", density=0.3, epochs=4, warmup=E(0), phase_length=E(1), final_dense=E(1),
                         final_sparse=E(1))
    assert m.phases[0] == (0, SPE, "sparse")
    logs = m.setup()
    assert sum(m.masks.nnz()) == round(0.3 * sum(m.masks.numels)) and logs["acdc/compress"] == 1.0


# --- both ----------------------------------------------------------------------------------------
CASES = [
    ("gmp", dict(start=E(2), end=E(8), frequency=E(2))),
    ("gmp", dict(start=E(2), end=E(8), frequency=E(2), scope="layer")),
    ("acdc", SMALL),
]


def _ids(case):
    return case[0] + ("-" + case[1]["scope"] if "scope" in case[1] else "")


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("split", [2, 5])
def test_state_dict_round_trip_mid_run_is_bit_identical(case, split):
    name, over = case
    model, opt, m = make(name, density=0.2, epochs=10, **over)
    m.setup()
    train(model, opt, m, 1, split)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "method": m.state_dict()}, buf)
    train(model, opt, m, split + 1, 10)

    model2, opt2, m2 = make(name, density=0.2, epochs=10, seed=7, **over)  # different init: all state must load
    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    m2.load_state_dict(copy.deepcopy(ck["method"]))
    train(model2, opt2, m2, split + 1, 10)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(m.masks.masks, m2.masks.masks):
        assert torch.equal(a, b)
    assert sum(m2.masks.nnz()) == round(0.2 * sum(m2.masks.numels))


@pytest.mark.parametrize("case", CASES[::2], ids=_ids)
def test_short_training_improves_loss(case):
    name, over = case
    model, opt, m = make(name, density=0.2, epochs=10, lr=0.3, **over)
    m.setup()
    before = loss_of(model)
    train(model, opt, m, 1, 10)
    assert loss_of(model) < 0.3 * before


@pytest.mark.parametrize("name,extra", [
    ("gmp", ["method.start={unit:epoch,value:1}", "method.end={unit:epoch,value:5}",
             "method.frequency={unit:epoch,value:2}"]),
    ("acdc", ["method.warmup={unit:epoch,value:1}", "method.phase_length={unit:epoch,value:1}",
              "method.final_dense={unit:epoch,value:1}", "method.final_sparse={unit:epoch,value:1}"]),
])
def test_cli_run_ends_at_the_target_density(tmp_path, monkeypatch, name, extra):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = [f"method={name}", "dataset=digits", "model=mlp", "logger=none", "schedule=constant",
            "schedule.epochs=6", "density=0.2", f"paths.runs={tmp_path}", "progress=false",
            "eval.train_samples=0", *extra]
    proc = cli_here(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / f"digits-mlp-{name}-d0.2-s0"
    res = json.loads((folder / "results.json").read_text())
    total = res["prunable"]["total"]
    assert res["density"]["achieved"] == round(0.2 * total) / total
    assert res["final"]["test/acc"] > 0.5
    recs = [r for r in read_jsonl(folder / "metrics.jsonl") if "train/loss" in r]
    dens = [r["density/achieved"] for r in recs]
    if name == "gmp":  # dense, then 0.3 after epoch 3, then 0.2 from epoch 5 (events 1, 3, 5)
        assert dens[0] == 1.0 and dens[-1] == round(0.2 * total) / total
        assert all(a >= b for a, b in zip(dens, dens[1:]))
        assert any("gmp/target_density" in r for r in read_jsonl(folder / "metrics.jsonl") if r.get("update"))
    else:  # phases 0-1 d, 1-2 s, 2-3 d, 3-4 s, 4-5 d, 5-6 s: the state after each epoch end
        sparse = round(0.2 * total) / total
        assert dens == [sparse, 1.0, sparse, 1.0, sparse, sparse]


@pytest.mark.parametrize("case", CASES[::2], ids=_ids)
def test_gradients_of_pruned_weights_are_masked(case):
    """The references mask gradients (hooks) as well as weights once a mask is in force."""
    name, over = case
    model, opt, m = make(name, density=0.2, epochs=10, **over)
    m.setup()
    train(model, opt, m, 1, 4)  # both methods have a mask in force after epoch 4
    assert sum(m.masks.nnz()) < sum(m.masks.numels)
    nn.functional.cross_entropy(model(X), Y).backward()
    assert any(torch.any(p.grad[~k] != 0) for p, k in zip(m.masks.params, m.masks.masks))
    m.before_optimizer_step(4 * SPE)
    for p, k in zip(m.masks.params, m.masks.masks):
        assert torch.all(p.grad[~k] == 0) and torch.any(p.grad[k] != 0)
