import copy
import math

import pytest
import torch
from torch import nn

from ddim_edu.toy.nets import MLPEps, sinusoidal_embedding
from ddim_edu.schedules import cosine_schedule, linear_schedule
from ddim_edu.toy.datasets import eight_gaussians
from ddim_edu.training import TrainConfig, TrainResult, load_checkpoint, simple_loss, train_eps_model, warmup_cosine
from ddim_edu.utils import threads as threads_module

SCHEDULE = linear_schedule()


def _small_model(seed=0, **kw):
    torch.manual_seed(seed)
    return MLPEps(hidden=kw.pop("hidden", 32), n_blocks=kw.pop("n_blocks", 1), emb_dim=kw.pop("emb_dim", 16), **kw)


def _data(n=512, seed=0):
    return eight_gaussians(n, generator=torch.Generator().manual_seed(seed))


# --- sinusoidal embedding ------------------------------------------------------------------

def test_sinusoidal_embedding_values():
    t = torch.tensor([0.0, 1.0, 2.5, 999.0], dtype=torch.float64)
    e = sinusoidal_embedding(t, 8)
    omega = 10000.0 ** (-torch.arange(4, dtype=torch.float64) / 4)
    torch.testing.assert_close(e, torch.cat([torch.cos(t[:, None] * omega), torch.sin(t[:, None] * omega)], 1))
    assert torch.equal(e[0], torch.tensor([1.0] * 4 + [0.0] * 4, dtype=torch.float64))
    # the highest frequency is 1 rad per timestep
    assert e[1, 0].item() == pytest.approx(math.cos(1.0)) and e[1, 4].item() == pytest.approx(math.sin(1.0))


def test_sinusoidal_embedding_inner_product_depends_only_on_time_difference():
    # Σ_k cos(tω_k)cos(sω_k) + sin(tω_k)sin(sω_k) = Σ_k cos((t − s)ω_k)
    t = torch.tensor([3.0, 103.0, 500.0, 600.0], dtype=torch.float64)
    e = sinusoidal_embedding(t, 64)
    assert (e[0] @ e[1]).item() == pytest.approx((e[2] @ e[3]).item(), rel=1e-10)
    assert (e * e).sum(1).tolist() == pytest.approx([32.0] * 4)


def test_sinusoidal_embedding_dtype_odd_dim_and_errors():
    assert sinusoidal_embedding(torch.tensor([1.0, 2.0]), 16).dtype == torch.float32
    assert sinusoidal_embedding(torch.tensor([1, 2]), 16).dtype == torch.float32
    assert sinusoidal_embedding(torch.tensor(3.0, dtype=torch.float64), 16).shape == (1, 16)
    odd = sinusoidal_embedding(torch.tensor([5.0]), 7)
    assert odd.shape == (1, 7) and odd[0, -1] == 0
    with pytest.raises(ValueError, match="dim"):
        sinusoidal_embedding(torch.tensor([1.0]), 1)
    with pytest.raises(ValueError, match="t must be"):
        sinusoidal_embedding(torch.zeros(2, 2), 8)


# --- MLPEps --------------------------------------------------------------------------------

def test_mlp_contract_zero_init_and_dtypes():
    model = MLPEps(dim=3, hidden=32, n_blocks=2, emb_dim=16)
    x = torch.randn(5, 3)
    t = torch.tensor([0.0, 1.0, 10.0, 500.0, 999.0])
    out = model(x, t)
    assert out.shape == (5, 3) and out.dtype == torch.float32
    assert torch.equal(out, torch.zeros(5, 3))  # zero output layer: ε_θ = 0 before training
    nn.init.normal_(model.out[1].weight)  # make the output depend on x and t
    out = model(x, t)
    assert not torch.allclose(out[0], out[1])
    # float64 copy: same function, evaluated in float64
    model64 = copy.deepcopy(model).double()
    out64 = model64(x.double(), t.double())
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), out, rtol=1e-4, atol=1e-5)
    # a scalar t is used for the whole batch
    torch.testing.assert_close(model(x, torch.tensor(10.0)), model(x, torch.full((5,), 10.0)))
    # float64 input to a float32 module: computed in float32, returned as float64
    assert model(x.double(), t).dtype == torch.float64


def test_mlp_bad_inputs():
    model = MLPEps(dim=2, hidden=8, n_blocks=1, emb_dim=4)
    with pytest.raises(ValueError, match=r"x must have shape \[B, 2\]"):
        model(torch.zeros(4, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="t must have shape"):
        model(torch.zeros(4, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="hidden"):
        MLPEps(hidden=0)


# --- the simple loss -----------------------------------------------------------------------

def test_simple_loss_is_zero_for_the_exact_eps_of_a_point_mass():
    # data = a single point c: x_t = sqrt(ᾱ_t) c + sqrt(1−ᾱ_t) ε, so ε = (x_t − sqrt(ᾱ_t) c)/sqrt(1−ᾱ_t) exactly,
    # provided the network input t indexes alphas_cumprod as the loss does
    c = torch.tensor([[0.7, -1.2]], dtype=torch.float64)

    def oracle(x, t):
        a = SCHEDULE.alphas_cumprod[t.long()][:, None]
        return (x - a.sqrt() * c) / (1 - a).sqrt()

    def off_by_one(x, t):
        a = SCHEDULE.alphas_cumprod[(t.long() + 1).clamp(max=SCHEDULE.T - 1)][:, None]
        return (x - a.sqrt() * c) / (1 - a).sqrt()

    x0 = c.expand(4096, 2)
    g = torch.Generator().manual_seed(0)
    assert simple_loss(oracle, x0, SCHEDULE, g).item() < 1e-20
    assert simple_loss(off_by_one, x0, SCHEDULE, torch.Generator().manual_seed(0)).item() > 1e-6
    # ε_θ = 0 scores E‖ε‖² = d
    zero = simple_loss(lambda x, t: torch.zeros_like(x), x0, SCHEDULE, g).item()
    assert zero == pytest.approx(2.0, abs=0.15)


def test_simple_loss_passes_timestep_indices_and_is_reproducible():
    seen = []

    def spy(x, t):
        seen.append(t)
        return torch.zeros_like(x)

    x0 = torch.zeros(2000, 2)
    a = simple_loss(spy, x0, SCHEDULE, torch.Generator().manual_seed(1))
    b = simple_loss(spy, x0, SCHEDULE, torch.Generator().manual_seed(1))
    assert a.item() == b.item()
    t = seen[0]
    assert t.shape == (2000,) and t.dtype == torch.float32
    assert torch.equal(t, t.round()) and t.min() >= 0 and t.max() <= SCHEDULE.T - 1
    assert abs(t.mean().item() - (SCHEDULE.T - 1) / 2) < 30  # uniform on {0..T-1}: std of the mean ≈ 6.5


# --- the training loop ---------------------------------------------------------------------

def test_training_is_reproducible_bitwise():
    data = _data()
    runs = [train_eps_model(_small_model(), data, SCHEDULE, TrainConfig.toy(steps=15, batch_size=64, seed=3), progress=False)
            for _ in range(2)]
    for p, q in zip(runs[0].model.parameters(), runs[1].model.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(runs[0].ema.parameters(), runs[1].ema.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(runs[0].losses, runs[1].losses)
    other = train_eps_model(_small_model(), data, SCHEDULE, TrainConfig.toy(steps=15, batch_size=64, seed=4), progress=False)
    assert not torch.equal(other.losses, runs[0].losses)


def test_loss_decreases_on_eight_gaussians():
    data = _data(4096)
    result = train_eps_model(_small_model(hidden=64, n_blocks=2), data, SCHEDULE,
                             TrainConfig.toy(steps=200, batch_size=128, lr=3e-3, warmup=20), progress=False)
    assert isinstance(result, TrainResult) and result.losses.shape == (200,)
    first, last = result.losses[:20].mean().item(), result.losses[-50:].mean().item()
    assert first > 1.4  # ε_θ starts at 0: loss ≈ d = 2
    assert last < 0.5 * first
    assert result.steps_per_second > 0


def test_ema_follows_the_documented_update():
    decay = 0.8
    weights = []

    def record(step, loss, model, ema):
        weights.append([p.detach().clone() for p in model.parameters()])

    model = _small_model()
    result = train_eps_model(model, _data(), SCHEDULE,
                             TrainConfig.toy(steps=6, batch_size=32, lr=1e-2, ema_decay=decay, warmup=0),
                             progress=False, callback=record)
    assert result.model is model and result.ema is not model
    assert not result.ema.training
    # first update copies, later ones θ_ema ← decay θ_ema + (1 − decay) θ
    expected = weights[0]
    for w in weights[1:]:
        expected = [decay * e + (1 - decay) * p for e, p in zip(expected, w)]
    for e, p in zip(expected, result.ema.parameters()):
        torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(next(result.ema.parameters()), weights[-1][0])
    # the EMA copy follows the model contract
    out = result.ema(torch.zeros(3, 2), torch.tensor([0.0, 5.0, 999.0]))
    assert out.shape == (3, 2)


def test_training_in_float64():
    model = _small_model().double()
    result = train_eps_model(model, _data().double(), SCHEDULE, TrainConfig.toy(steps=5, batch_size=16), progress=False)
    assert next(result.ema.parameters()).dtype == torch.float64
    assert result.losses.dtype == torch.float64 and bool(torch.isfinite(result.losses).all())


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert warmup_cosine(100, 100, 10, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(0, 100, 0, 0.0) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(steps=0), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(batch_size=0), "batch_size"),
        (dict(lr=0.0), "lr"),
        (dict(ema_decay=1.5), "ema_decay"),
        (dict(warmup=-1), "warmup"),
        (dict(final_lr_fraction=2.0), "final_lr_fraction"),
        (dict(lr=math.inf), "lr must be a finite number"),
        (dict(lr=math.nan), "lr must be a finite number"),
    ],
)
def test_bad_training_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        train_eps_model(_small_model(), _data(), SCHEDULE, TrainConfig.toy(**kwargs), progress=False)


def test_bad_training_data_and_model():
    with pytest.raises(ValueError, match="data"):
        train_eps_model(_small_model(), torch.zeros(10), SCHEDULE, TrainConfig.toy(steps=1), progress=False)
    with pytest.raises(ValueError, match="data"):
        train_eps_model(_small_model(), torch.zeros(10, 2, dtype=torch.long), SCHEDULE, TrainConfig.toy(steps=1),
                        progress=False)
    with pytest.raises(ValueError, match="model"):
        train_eps_model(lambda x, t: x, _data(), SCHEDULE, TrainConfig.toy(steps=1), progress=False)


# --- non-finite values stop the run; the last checkpoint stays as it was --------------------------


class NaNAt(nn.Module):
    """An MLPEps whose output (``where="loss"``) or gradient (``where="gradient"``) is NaN from its ``at``-th call on."""

    def __init__(self, at, where="loss"):
        super().__init__()
        self.net, self.at, self.where, self.calls = _small_model(), at, where, 0

    def forward(self, x, t):
        self.calls += 1
        out = self.net(x, t)
        if self.calls > self.at:
            out = out * math.nan if self.where == "loss" else _NaNGradient.apply(out)
        return out


class _NaNGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.nan


@pytest.mark.parametrize("where, grad_clip", [("loss", None), ("loss", 1.0), ("gradient", None), ("gradient", 1.0)])
def test_nan_stops_training_and_keeps_the_last_checkpoint(tmp_path, where, grad_clip):
    ckpt = tmp_path / "run.pt"
    seen = []
    what = "loss" if where == "loss" else "gradient norm"
    with pytest.raises(FloatingPointError, match=rf"at step 7 \(0-based\) the {what} is nan.*written after 5 steps, "
                                                 "is left as it was"):
        train_eps_model(NaNAt(7, where), _data(), SCHEDULE, TrainConfig.toy(steps=12, batch_size=32, grad_clip=grad_clip),
                        checkpoint=ckpt, checkpoint_every=5, progress=False, callback=lambda step, *_: seen.append(step))
    assert seen == list(range(7))  # stopped at the first bad step, before its update
    saved = load_checkpoint(ckpt)
    assert saved["step"] == 5 and bool(torch.isfinite(saved["losses"]).all())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]


def test_nan_found_by_a_later_check_names_its_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    """As on CUDA, where the values are checked every few steps (here 4) and before each checkpoint: the run goes on
    past the bad step until the next check, but the error names it and no checkpoint after it is written."""
    from ddim_edu import training

    monkeypatch.setattr(training, "_finite_check_every", lambda device: 4)
    ckpt = tmp_path / "run.pt"
    seen = []
    with pytest.raises(FloatingPointError, match=r"at step 7 \(0-based\) the loss is nan.*written after 5 steps"):
        train_eps_model(NaNAt(7), _data(), SCHEDULE, TrainConfig.toy(steps=12, batch_size=32), checkpoint=ckpt,
                        checkpoint_every=5, progress=False, callback=lambda step, *_: seen.append(step))
    assert seen == list(range(8))  # steps 5, 6 and 7 ran; the check before step 8's update found step 7
    assert load_checkpoint(ckpt)["step"] == 5
    with pytest.raises(FloatingPointError, match=r"at step 7 \(0-based\) the loss is nan.*written after 7 steps"):
        train_eps_model(NaNAt(7), _data(), SCHEDULE, TrainConfig.toy(steps=12, batch_size=32), checkpoint=tmp_path / "b.pt",
                        checkpoint_every=1, progress=False)  # checked before every checkpoint
    assert load_checkpoint(tmp_path / "b.pt")["step"] == 7


def test_diverging_run_never_writes_non_finite_weights(tmp_path):
    """lr = 1e30: the weights blow up after the first update and the loss overflows; no checkpoint holds either."""
    ckpt = tmp_path / "run.pt"
    with pytest.raises(FloatingPointError, match="training stopped"):
        train_eps_model(_small_model(), _data(), SCHEDULE, TrainConfig.toy(steps=20, batch_size=32, lr=1e30, warmup=0),
                        checkpoint=ckpt, checkpoint_every=1, progress=False)
    if ckpt.exists():
        saved = load_checkpoint(ckpt)
        for part in ("model", "ema"):
            assert all(bool(torch.isfinite(v).all()) for v in saved[part].values()), part
        assert bool(torch.isfinite(saved["losses"]).all())


def test_data_with_nan_are_refused_before_training():
    data = _data()
    data[17, 1] = math.nan
    with pytest.raises(ValueError, match=r"NaN or inf values in 1 of 512 examples, the first at index 17"):
        train_eps_model(_small_model(), data, SCHEDULE, TrainConfig.toy(steps=2, batch_size=32), progress=False)


# --- the checkpoint stores the schedule and the data range, and a resume must match them -----------------


def _run(tmp_path, steps, data=None, schedule=SCHEDULE, **kw):
    return train_eps_model(_small_model(), _data() if data is None else data, schedule,
                           TrainConfig.toy(steps=steps, batch_size=32), checkpoint=tmp_path / "run.pt", progress=False, **kw)


def test_resume_under_another_schedule_is_refused(tmp_path):
    _run(tmp_path, 2)
    saved = load_checkpoint(tmp_path / "run.pt")
    assert torch.equal(saved["schedule_betas"], SCHEDULE.betas)
    with pytest.raises(ValueError, match=r"other settings: noise schedule: stored β_1 = 0.0001, β_T = 0.02, "
                                         r"given Schedule\(T=1000"):
        _run(tmp_path, 4, schedule=cosine_schedule())
    with pytest.raises(ValueError, match=r"noise schedule: stored T = 1000"):
        _run(tmp_path, 4, schedule=linear_schedule(500))
    assert load_checkpoint(tmp_path / "run.pt")["step"] == 2


def test_resume_with_another_data_range_is_refused(tmp_path):
    data = _data()
    _run(tmp_path, 2, data)
    saved = load_checkpoint(tmp_path / "run.pt")["data_range"]
    assert saved == {"dtype": "float32", "min": data.min().item(), "max": data.max().item()}
    with pytest.raises(ValueError, match=r"other settings: data range \(as the network sees it\): stored \[-?\d"):
        _run(tmp_path, 4, data * 3)
    with pytest.raises(ValueError, match="data range"):
        _run(tmp_path, 4, data + 1)
    # a new draw of the same distribution is the same data range
    assert _run(tmp_path, 4, _data(seed=1)).step == 4


def test_checkpoint_without_schedule_and_data_range_still_resumes_exactly(tmp_path):
    """Checkpoints written before these entries existed resume (unchecked there), bit for bit."""
    straight = _run(tmp_path / "a", 4)
    _run(tmp_path / "b", 2)
    path = tmp_path / "b" / "run.pt"
    old = torch.load(path, weights_only=True)
    del old["schedule_betas"], old["data_range"]
    torch.save(old, path)
    resumed = _run(tmp_path / "b", 4)
    assert torch.equal(resumed.losses, straight.losses)
    for p, q in zip(resumed.model.parameters(), straight.model.parameters()):
        assert torch.equal(p, q)
    assert "schedule_betas" in load_checkpoint(path)  # written again from then on
    with pytest.raises(ValueError, match="must not replace the trainer's entries"):
        _run(tmp_path / "c", 1, checkpoint_extra={"data_range": 1})


# --- threads ------------------------------------------------------------------------------------


@pytest.fixture
def torch_default_threads(monkeypatch):
    """As if torch ran with its default of 2 threads that nobody chose."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads_module, "_THREADS_AT_IMPORT", 2)
    monkeypatch.setattr(threads_module, "_physical_cores", lambda: 2)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("env, threads, expected", [(None, None, 1), ("2", None, 2), (None, 2, 2), (None, 1, 1)])
def test_small_models_train_on_one_thread_unless_the_user_chose(torch_default_threads, monkeypatch, env, threads,
                                                                expected):
    if env is not None:
        monkeypatch.setenv("OMP_NUM_THREADS", env)
    seen = []
    train_eps_model(_small_model(), _data(), SCHEDULE, TrainConfig.toy(steps=2, batch_size=16), progress=False,
                    threads=threads, callback=lambda *_: seen.append(torch.get_num_threads()))
    assert seen == [expected] * 2
    assert torch.get_num_threads() == 2  # given back


def test_threads_set_by_the_user_are_kept(torch_default_threads):
    torch.set_num_threads(3)  # differs from torch's default: the user's choice
    assert threads_module.threads_chosen_by_user() and threads_module.choose_threads(None, small=True) is None
    torch.set_num_threads(2)
    assert not threads_module.threads_chosen_by_user() and threads_module.choose_threads(None, small=True) == 1
    assert threads_module.choose_threads(None, small=False) is None
    with pytest.raises(ValueError, match="threads"):
        threads_module.choose_threads(0, small=True)
