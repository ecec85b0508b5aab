"""Sampling and training throughput: ddim_edu's DDIM sampler and trainer side by side with diffusers' DDIMPipeline.

On a GPU the network is the DDPM CIFAR-10 UNet (``UNetConfig()``, 35.7M parameters). Sampling is
DDIM (Eq 12, η = 0) with S = 50 evenly spaced steps at batch 256 and 1024, in float32 and under bfloat16
autocast, with and without ``torch.compile``; training is batch 128 with AdamW under bf16 autocast.
Without a GPU the same measurements run on the CPU with a tiny UNet (16×16, base 32, two levels),
batch 16 and 32, S = 10, so that they finish in a minute or two.

diffusers runs as a user runs ``DDIMPipeline``: a ``UNet2DModel`` holding the same weights
(:func:`ddim_edu.image.pretrained.to_diffusers_state_dict`), ``DDIMScheduler`` with the same schedule and
timesteps (its "leading" spacing is our ``"leading"``: S points 0, ⌊T/S⌋, …, the same as ``"uniform"`` when S
divides T; ``clip_sample=False`` as in the paper's Eq 12 and our default),
``pipe(batch_size=B, num_inference_steps=S, eta=0, generator=g, output_type="np")``.
"diffusers default" is that pipeline in float32 without compile; "diffusers, same settings" runs it
under the same autocast and ``torch.compile`` as ours. Ours does the same work: noise drawn on the
device, ``sample(model, x_T, schedule, schedule.timesteps(S, "leading"), method="ddim")``, and the pipeline's
post-processing to a numpy array on the host.

Timing: a warm-up run with S = 2 (same shapes, so it triggers every compilation; reported as
"first call"), then the median of ``--repeats`` full runs, each between ``torch.cuda.synchronize()``
calls; the variants of one setting take turns run by run, so that a busy spell on a shared machine
hits them alike. Peak memory is ``torch.cuda.max_memory_allocated()`` over the timed runs; both networks stay
resident the whole time, so each peak includes both sets of weights. "network" is the model alone,
called as each sampler calls it, ``min(S, 10)`` times; "rest of the loop" is the run's time per step
minus that. Training is timed between synchronisations after a few warm-up steps.

    python benchmarks/gpu_throughput.py                  # GPU if there is one, else the CPU; writes docs/benchmarks.md
                                                         # (CPU: ~2 min; GPU: several minutes, mostly compiling 8 graphs: an estimate)
    python benchmarks/gpu_throughput.py --no-compile     # skip torch.compile (on the CPU it is off unless --compile)
    python benchmarks/gpu_throughput.py --weights google/ddpm-cifar10-32   # a local diffusers folder (optional)
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import itertools
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ddim_edu.image.data import pixels_to_float
from ddim_edu.image.training import train_image_model
from ddim_edu.image.pretrained import diffusers_config, load_unet, to_diffusers_state_dict
from ddim_edu.schedules import linear_schedule
from ddim_edu.solvers import sample
from ddim_edu.training import TrainConfig, simple_loss
from ddim_edu.image.unet import UNet, UNetConfig

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
DOC_TITLE = "# Benchmarks\n\nEach section is written by the script it names; a script replaces only its own section.\n"
TINY = UNetConfig(image_size=16, base_channels=32, channel_mult=(1, 2), attention_resolutions=(8,), norm_groups=8)
TARGET_VS_DEFAULT = 2.0  # the project's targets: ours >= 2x diffusers' default pipeline ...
TARGET_VS_SAME = 1.0  # ... and no slower than diffusers given the same bf16 / compile settings


# --- the Markdown file shared by the benchmark scripts -------------------------------------------------


def publish(heading: str, body: str, write: bool = True) -> None:
    """Print the section, and (``write``) put it into docs/benchmarks.md in place of its earlier version."""
    print("\n" + heading + "\n\n" + body)
    if write:
        write_section(heading, body)
        print(f"wrote the section {heading[3:]!r} of {DOC}")


def write_section(heading: str, body: str, path: Path = DOC) -> None:
    """Put ``heading`` (a ``## `` line) and ``body`` into ``path``, replacing only the section with that heading."""
    text = path.read_text() if path.is_file() else DOC_TITLE
    lines = text.rstrip("\n").split("\n")
    section = [heading, "", *body.rstrip("\n").split("\n")]
    if heading in lines:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        while end > start + 1 and lines[end - 1] == "":
            end -= 1  # keep the blank line before the next section outside ours
        lines[start:end] = section
    else:
        lines += ["", *section]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


# --- timing -----------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Median seconds of one timed call, the first (warm-up) call's seconds, peak memory in MiB (CUDA only)."""

    seconds: float = float("nan")
    first_s: float = float("nan")
    peak_mib: float | None = None
    error: str | None = None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(runs: dict[str, tuple[Callable, Callable]], device: torch.device, repeats: int) -> dict[str, Timing]:
    """For each name, ``(run, warm)``: ``warm()`` once (compilation, lazy initialisation), then ``repeats``
    rounds in which every ``run()`` is timed in turn between synchronisations (interleaved, so that a
    busy spell of a shared machine hits all of them alike); the median per name."""
    first, times, peaks = {}, {name: [] for name in runs}, {}
    for name, (_, warm) in runs.items():
        synchronize(device)
        start = time.perf_counter()
        warm()
        synchronize(device)
        first[name] = time.perf_counter() - start
    for _ in range(repeats):
        for name, (run, _) in runs.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
            if device.type == "cuda":
                peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated(device) / 2**20)
    return {name: Timing(statistics.median(times[name]), first[name], peaks.get(name)) for name in runs}


def failure(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:160] if lines else ''}"


# --- the two samplers, doing the same work ------------------------------------------------------------------


def postprocess(x0: torch.Tensor):
    """DDIMPipeline's output_type="np": [-1, 1] to [0, 1], on the host, channels last."""
    return (x0 / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def ours_sampler(model, schedule, shape, device, bf16: bool):
    def run(S: int):
        g = torch.Generator(device).manual_seed(0)
        x_T = torch.randn(shape, generator=g, device=device)
        with autocast(device, bf16):
            x0 = sample(model, x_T, schedule, schedule.timesteps(S, "leading"), method="ddim", eta=0.0)
        return postprocess(x0)

    return run


def diffusers_sampler(pipe, batch: int, device, bf16: bool):
    def run(S: int):
        g = torch.Generator(device).manual_seed(0)
        with autocast(device, bf16):
            return pipe(batch_size=batch, generator=g, eta=0.0, num_inference_steps=S, output_type="np").images

    return run


def forward_only(call, x, t, device, bf16: bool, n: int):
    """``n`` network evaluations as a sampler makes them (no_grad, same autocast)."""
    def run():
        with torch.no_grad(), autocast(device, bf16):
            for _ in range(n):
                call(x, t)

    return run


def make_diffusers(model: UNet, device):
    """``UNet2DModel`` with our model's weights, a DDIMScheduler for DDPM's linear schedule, and the pipeline class."""
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    unet = UNet2DModel(**diffusers_config(model.config))
    unet.load_state_dict(to_diffusers_state_dict(model.state_dict()), strict=True)
    unet = unet.to(device).eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                              clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    return unet, scheduler, DDIMPipeline


def pipeline(DDIMPipeline, unet, scheduler):
    pipe = DDIMPipeline(unet=unet, scheduler=copy.deepcopy(scheduler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def agreement(model, unet, scheduler, schedule, shape, S, device) -> float:
    """max |x_0(ours) - x_0(diffusers)| / max |x_0| from the same noise, float32, before clamping to [-1, 1]."""
    x_T = torch.randn(shape, generator=torch.Generator(device).manual_seed(1), device=device)
    ours = sample(model, x_T, schedule, schedule.timesteps(S, "leading"), method="ddim", eta=0.0)
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(S)
    x = x_T
    for t in sched.timesteps:  # the DDIMPipeline loop
        x = sched.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    return ((ours - x).abs().max() / x.abs().max()).item()


# --- the grid of sampling measurements ----------------------------------------------------------------------


@dataclass
class Row:
    batch: int
    bf16: bool
    compiled: bool
    ours: Timing
    theirs: Timing
    net_ours: Timing
    net_theirs: Timing


def sampling_rows(model, unet, scheduler, DDIMPipeline, schedule, args, device, log) -> list[Row]:
    config = model.config
    S = args.steps
    n_net = min(S, 10)
    compiled_ours = compiled_theirs = None
    compile_error = None
    rows = []
    for batch in args.batches:
        shape = (batch, config.in_channels, config.image_size, config.image_size)
        x = torch.randn(shape, device=device)
        t_ours = torch.full((batch,), float(schedule.T // 2), device=device)
        t_theirs = torch.tensor(schedule.T // 2)  # the pipeline passes a 0-d int64 CPU tensor from scheduler.timesteps
        for bf16 in args.precisions:
            for compiled in ([False, True] if args.compile else [False]):
                if compiled and compile_error is not None:
                    skipped = Timing(error=compile_error)
                    rows.append(Row(batch, bf16, True, skipped, skipped, skipped, skipped, skipped))
                    continue
                try:
                    if compiled and compiled_ours is None:
                        # dynamic=False: one static graph per batch size and autocast state, compiled in the warm-up
                        compiled_ours = torch.compile(model, dynamic=False)
                        compiled_theirs = torch.compile(unet, dynamic=False)
                    net, dnet = (compiled_ours, compiled_theirs) if compiled else (model, unet)
                    pipe = pipeline(DDIMPipeline, dnet, scheduler)
                    samplers = {
                        "ours": ours_sampler(net, schedule, shape, device, bf16),
                        "theirs": diffusers_sampler(pipe, batch, device, bf16),
                    }
                    calls = {
                        "net_ours": forward_only(net, x, t_ours, device, bf16, n_net),
                        "net_theirs": forward_only(lambda x, t, dnet=dnet: dnet(x, t).sample, x, t_theirs, device, bf16, n_net),
                    }
                    runs = {name: (lambda run=run: run(S), lambda run=run: run(2)) for name, run in samplers.items()}
                    runs.update({name: (run, run) for name, run in calls.items()})
                    result = measure(runs, device, args.repeats)
                except Exception as err:  # report it in the table and go on with the other settings
                    setting = f"batch {batch}, {'bf16' if bf16 else 'fp32'}, compile {'on' if compiled else 'off'}"
                    error = f"{setting}: {failure(err)}"
                    out_of_memory = isinstance(err, torch.cuda.OutOfMemoryError)
                    if compiled and not out_of_memory:  # a compiler failure: skip the remaining compiled settings
                        compile_error = f"torch.compile failed ({error}); the later compiled settings were skipped"
                        error = compile_error
                        torch._dynamo.reset()
                    log(error)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    failed = Timing(error=error)
                    rows.append(Row(batch, bf16, compiled, failed, failed, failed, failed))
                    continue
                row = Row(batch, bf16, compiled, **result)
                rows.append(row)
                log(f"batch {batch:5d} {'bf16' if bf16 else 'fp32'} compile={'on ' if compiled else 'off'}: "
                    f"ours {batch / row.ours.seconds:8.1f} img/s, diffusers {batch / row.theirs.seconds:8.1f} img/s, "
                    f"ratio {row.theirs.seconds / row.ours.seconds:.2f}")
    return rows


# --- training ---------------------------------------------------------------------------------------------------


def training_rows(model_config, schedule, args, device, log) -> list[tuple[str, Timing]]:
    """Our trainer as it runs (AdamW, clipping, EMA, bf16 + channels_last on CUDA), and one plain
    simple_loss + AdamW loop for each network, the same loop for both."""
    from diffusers import UNet2DModel

    B, warm, window = args.train_batch, args.train_warmup, args.train_window
    C, H = model_config.in_channels, model_config.image_size
    data = torch.randint(0, 256, (max(1024, B), C, H, H), dtype=torch.uint8, device=device)  # content does not matter here
    bf16 = device.type == "cuda"  # train_image_model ignores bf16 on a CPU; the plain loops follow it
    rows = []

    # ours: train_image_model, timed between synchronisations in its per-step callback
    marks: list[float] = []

    def callback(step, loss, model, ema):
        if step >= warm - 1 and (step - warm + 1) % window == 0:
            synchronize(device)
            marks.append(time.perf_counter())
            if len(marks) == 1 and device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)

    torch.manual_seed(0)
    model = UNet(model_config).to(device)
    start = time.perf_counter()
    recipe = TrainConfig(steps=warm + window * args.repeats, batch_size=B, lr=2e-4, warmup=100)
    train_image_model(model, data, schedule, recipe, bf16=True, progress=False, callback=callback)
    windows = [b - a for a, b in itertools.pairwise(marks)]
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    rows.append(("ours: `train_image_model` (AdamW, grad clip, EMA" + (", bf16, channels_last)" if bf16 else ")"),
                 Timing(statistics.median(windows), marks[0] - start, peak)))
    del model
    log(f"training, our trainer: {window * B / rows[-1][1].seconds:.1f} img/s")

    def plain_loop(net, call):
        """(run, warm-up) of the same simple_loss + AdamW loop for either network."""
        optimizer = torch.optim.AdamW(net.parameters(), lr=2e-4)
        g = torch.Generator().manual_seed(0)

        def steps(n):
            for _ in range(n):
                x0 = pixels_to_float(data[torch.randint(0, len(data), (B,), generator=g).to(device)])
                with autocast(device, bf16):
                    loss = simple_loss(call, x0, schedule, g)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

        net.train()
        return lambda: steps(window), lambda: steps(warm)

    torch.manual_seed(0)
    init = UNet(model_config).state_dict()  # one initialisation for both networks, kept on the host

    def ours():
        net = UNet(model_config).to(device)
        net.load_state_dict(init)
        return plain_loop(net, net)

    def theirs():
        net = UNet2DModel(**diffusers_config(model_config)).to(device)
        net.load_state_dict(to_diffusers_state_dict(init))
        return plain_loop(net, lambda x, t: net(x, t).sample)

    loops = {"our `UNet`, plain loop (`simple_loss` + AdamW)": ours,
             "diffusers `UNet2DModel`, the same plain loop": theirs}
    if device.type == "cuda":  # one at a time, so that each peak holds only its own network and optimiser state
        for name, make in loops.items():
            rows.append((name, measure({name: make()}, device, args.repeats)[name]))
            torch.cuda.empty_cache()
    else:  # taking turns, as the sampling runs do: a shared CPU's busy spells hit both alike
        rows += list(measure({name: make() for name, make in loops.items()}, device, args.repeats).items())
    for name, t in rows[1:]:
        log(f"training, {name}: {window * B / t.seconds:.1f} img/s")
    return rows


# --- report ------------------------------------------------------------------------------------------------------


def fmt(x: float, digits: int = 1) -> str:
    return "—" if math.isnan(x) else f"{x:,.{digits}f}"


def report(rows: list[Row], train: list[tuple[str, Timing]], args, device, config, n_params, agree, elapsed) -> str:
    S = args.steps
    prec = lambda r: "bf16 autocast" if r.bf16 else "fp32"
    default = {r.batch: r.theirs.seconds for r in rows if not r.bf16 and not r.compiled}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        machine = (f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, "
                   f"cuDNN {torch.backends.cudnn.version()}; TF32: convolutions "
                   f"{'on' if torch.backends.cudnn.allow_tf32 else 'off'}, matmuls "
                   f"{'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'} (PyTorch's defaults, left as they are)")
    else:
        machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (1-minute load average "
                   f"{args.load_before:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores; above "
                   f"{os.cpu_count()} other work shared the cores)")
    import diffusers

    cmd = " ".join(["python", "benchmarks/gpu_throughput.py", *sys.argv[1:]])
    lines = [
        f"Written by `{cmd}` on {datetime.date.today().isoformat()} in {elapsed / 60:.1f} min: torch {torch.__version__}, "
        f"diffusers {diffusers.__version__}; {machine}.",
        "",
        f"Network: `UNet({'UNetConfig()' if config == UNetConfig() else config})`, {n_params / 1e6:.2f}M parameters, "
        f"{'weights from ' + args.weights if args.weights else 'random weights (speed does not depend on them)'}. "
        f"Sampling: DDIM, η = 0, **S = {S}** steps 0, ⌊T/S⌋, … (our \"leading\" τ; diffusers: `DDIMScheduler`, \"leading\" spacing, "
        f"the same timesteps), noise drawn on the device, output a host numpy array as `DDIMPipeline(output_type=\"np\")` "
        f"gives. From the same noise in fp32 the two samplers agree to {agree:.1e} (max |Δx_0| / max |x_0|). "
        f"Median of {args.repeats} runs after a warm-up run (S = 2, which also compiles); "
        f"`torch.compile(model, dynamic=False)` in its default mode.",
        "",
        f"Targets (the project's): ours ≥ {TARGET_VS_DEFAULT:g}× diffusers' default pipeline (fp32, no compile), "
        f"and ours / diffusers with the same settings ≥ {TARGET_VS_SAME:.2f} at every setting.",
        "",
    ]
    ok = [r for r in rows if r.ours.error is None]
    for batch in args.batches:
        mine = [r for r in ok if r.batch == batch]
        if not mine:
            continue
        best = min(mine, key=lambda r: r.ours.seconds)
        vs_default = default.get(batch, float("nan")) / best.ours.seconds
        worst = min(mine, key=lambda r: r.theirs.seconds / r.ours.seconds)
        vs_same = worst.theirs.seconds / worst.ours.seconds
        if math.isnan(vs_default):
            against_default = "diffusers' default pipeline was not measured (no fp32 run without compile)"
        else:
            met = "met" if vs_default >= TARGET_VS_DEFAULT else "not met"
            against_default = f"ours at its best ({prec(best)}, compile {'on' if best.compiled else 'off'}) is " \
                              f"**{vs_default:.2f}×** diffusers' default pipeline ({met})"
        lines.append(
            f"- batch {batch}: {against_default}; against diffusers with the same settings the lowest ratio is "
            f"**{vs_same:.2f}** ({prec(worst)}, compile {'on' if worst.compiled else 'off'}; "
            f"{'met' if vs_same >= TARGET_VS_SAME else 'not met'}).")
    errors = sorted({r.ours.error for r in rows if r.ours.error})
    lines += [f"- {e}" for e in errors]
    lines += [
        "",
        f"### Sampling throughput (images/s, DDIM S = {S})",
        "",
        "| batch | precision | compile | ours | diffusers, same settings "
        "| ours / diffusers same | ours / diffusers default |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r.batch} | {prec(r)} | {'on' if r.compiled else 'off'} "
        if r.ours.error:
            lines.append(head + "| failed | failed | — | — |")
            continue
        lines.append(head + f"| {fmt(r.batch / r.ours.seconds)} "
                     f"| {fmt(r.batch / r.theirs.seconds)} | {r.theirs.seconds / r.ours.seconds:.2f} "
                     f"| {default.get(r.batch, float('nan')) / r.ours.seconds:.2f} |")
    mib = lambda t: "—" if t.peak_mib is None else f"{t.peak_mib:,.0f}"
    lines += [
        "",
        "### Where a sampling step's time goes (ms per step), peak memory, first call",
        "",
        "\"network\": the model alone as the sampler calls it; \"rest\": a run's time per step minus that (the "
        "scheduler's arithmetic, per-step checks and synchronisations, noise, post-processing). "
        "Peak memory counts both networks' weights, resident throughout"
        + (f" ({2 * n_params * 4 / 2**20:,.0f} MiB in fp32)" if device.type == "cuda" else " (CPU: not measured)")
        + ". \"first call\": the S = 2 warm-up, seconds, compilation included (far shorter when torch's "
        "compile caches already hold the graph from an earlier run).",
        "",
        "| batch | precision | compile | ours: network | ours: rest | diffusers: network | diffusers: rest "
        "| peak MiB ours | peak MiB diffusers | first call ours / diffusers (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    n_net = min(S, 10)
    for r in rows:
        if r.ours.error:
            continue
        net_o, net_d = r.net_ours.seconds / n_net, r.net_theirs.seconds / n_net
        lines.append(
            f"| {r.batch} | {prec(r)} | {'on' if r.compiled else 'off'} | {net_o * 1e3:.2f} | {(r.ours.seconds / S - net_o) * 1e3:.2f} "
            f"| {net_d * 1e3:.2f} | {(r.theirs.seconds / S - net_d) * 1e3:.2f} | {mib(r.ours)} | {mib(r.theirs)} "
            f"| {r.ours.first_s:.1f} / {r.theirs.first_s:.1f} |")
    if train:
        B, window = args.train_batch, args.train_window
        lines += [
            "",
            f"### Training throughput (batch {B}, {'bf16 autocast' if device.type == 'cuda' else 'fp32'}, AdamW, no compile)",
            "",
            f"Random uint8 images on the device; median of {args.repeats} windows of {window} steps after "
            f"{args.train_warmup} warm-up steps.",
            "",
            "| what | images/s | ms/step | peak MiB |",
            "|---|---|---|---|",
        ]
        for name, t in train:
            lines.append(f"| {name} | {fmt(window * B / t.seconds)} | {t.seconds / window * 1e3:.1f} | {mib(t)} |")
        base = train[-1][1].seconds
        lines += ["", f"Our trainer / the diffusers plain loop: {base / train[0][1].seconds:.2f}; our UNet / diffusers' "
                  f"UNet2DModel in the same loop: {base / train[1][1].seconds:.2f}."]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="+", help="sampling batch sizes (GPU: 256 1024, CPU: 16 32)")
    parser.add_argument("--steps", type=int, help="DDIM steps S (GPU: 50, CPU: 10)")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction,
                        help="add the torch.compile rows (default: on a GPU; on the CPU each graph compiles for ~40 s)")
    parser.add_argument("--repeats", type=int, help="timed runs per measurement, median reported (GPU: 3, CPU: 5)")
    parser.add_argument("--train-batch", type=int, help="training batch (GPU: 128, CPU: 32)")
    parser.add_argument("--train-warmup", type=int, default=5, help="training steps before timing")
    parser.add_argument("--train-window", type=int, help="training steps per timed window (GPU: 20, CPU: 5)")
    parser.add_argument("--no-train", dest="train", action="store_false")
    parser.add_argument("--weights", help="a diffusers folder or checkpoint for ddim_edu.image.pretrained.load_unet (optional)")
    parser.add_argument("--no-doc", dest="doc", action="store_false", help=f"print only, do not update {DOC.relative_to(ROOT)}")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.batches = args.batches or ([256, 1024] if gpu else [16, 32])
    args.steps = args.steps or (50 if gpu else 10)
    args.train_batch = args.train_batch or (128 if gpu else 32)
    args.train_window = args.train_window or (20 if gpu else 5)
    args.repeats = args.repeats or (3 if gpu else 5)
    args.compile = gpu if args.compile is None else args.compile
    args.precisions = [p == "bf16" for p in dict.fromkeys(args.precisions)]
    heading = f"## Throughput: {torch.cuda.get_device_name(device) if gpu else f'CPU ({torch.get_num_threads()} threads)'}"

    begin = time.perf_counter()
    args.load_before = os.getloadavg()[0]
    log = lambda msg: print(f"[{time.perf_counter() - begin:6.1f} s] {msg}", flush=True)
    try:
        import diffusers  # noqa: F401
    except ImportError:
        sys.exit("this benchmark compares against diffusers: pip install -e '.[compare]'")
    schedule = linear_schedule(1000)
    torch.manual_seed(0)
    model = load_unet(args.weights) if args.weights else UNet(UNetConfig() if gpu else TINY)
    model = model.to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    unet, scheduler, DDIMPipeline = make_diffusers(model, device)
    c = model.config
    agree = agreement(model, unet, scheduler, schedule, (min(args.batches), c.in_channels, c.image_size, c.image_size),
                      args.steps, device)
    log(f"{heading[3:]}: {n_params / 1e6:.2f}M parameters, S = {args.steps}; ours vs diffusers from the same noise: {agree:.1e}")

    rows = sampling_rows(model, unet, scheduler, DDIMPipeline, schedule, args, device, log)
    del model, unet  # training starts from fresh networks, without these resident
    if gpu:
        torch.cuda.empty_cache()
    train, train_error = [], None
    if args.train:
        with contextlib.suppress(AttributeError):
            torch._dynamo.reset()  # the compiled sampling graphs are not needed any more
        try:
            train = training_rows(c, schedule, args, device, log)
        except Exception as err:  # keep the sampling results
            log(f"training failed: {failure(err)}")
            train_error = f"training failed: {failure(err)}"
    text = report(rows, train, args, device, c, n_params, agree, time.perf_counter() - begin)
    if train_error:
        text += f"\n{train_error}\n"
    publish(heading, text, args.doc)


if __name__ == "__main__":
    main()
