"""The `qarvd` command line."""

from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
from importlib.metadata import EntryPoint, PackageNotFoundError, entry_points, version
from pathlib import Path

import typer
from typer.core import TyperGroup

from qarvd_core.recipes import RECIPES

# `generate` holds the whole video in memory: ten minutes at 16 frames/s.
GENERATE_MAX_FRAMES = 9600
GENERATE_ACTIONS = "right*24,down*24,left*24,up*24"
# A text-to-video model's default length: 7 chunks of 3 latent frames, the 81 frames (5 s at
# 16 frames/s) Self-Forcing's released inference makes.
GENERATE_CHUNKS = 7


def command_line(ctx: typer.Context) -> str:
    """The running command as one would type it again: its path and the options not at their default."""
    words = ["qarvd", *ctx.command_path.split()[1:]]
    for p in ctx.command.params:
        value = ctx.params.get(p.name)
        if value is None or value == p.default or not p.opts:
            continue
        if isinstance(value, bool):
            words += [p.opts[0]] if value else p.secondary_opts[:1]
        else:
            for v in value if isinstance(value, list | tuple) else [value]:
                words += [p.opts[0], str(v)]
    return shlex.join(words)


def fail(message: str) -> None:
    """One clear message on stderr and exit code 2."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


@functools.cache
def plugin_commands() -> dict[str, EntryPoint]:
    """Commands installed packages add to `qarvd` (the service's `serve` and `worker`): entry points
    in the group `qarvd.commands`, each naming a typer command function and the extra it needs."""
    return {ep.name: ep for ep in entry_points(group="qarvd.commands")}


def missing_packages(ep: EntryPoint) -> list[str]:
    """The distributions that the entry point's extras require and that are not installed."""
    wanted = [req for req in ep.dist.requires or [] if any(_is_in_extra(req, extra) for extra in ep.extras)]
    missing = []
    for req in wanted:
        name = re.match(r"[A-Za-z0-9._-]+", req).group()
        try:
            version(name)
        except PackageNotFoundError:
            missing.append(name)
    return missing


def _is_in_extra(requirement: str, extra: str) -> bool:
    marker = requirement.partition(";")[2]
    return re.search(rf"""extra\s*==\s*["']{re.escape(extra)}["']""", marker) is not None


def load_plugin(ep: EntryPoint) -> typer.Typer:
    """The entry point's command, or, without its extra's packages, one that says how to install them."""
    missing = missing_packages(ep)
    if not missing:
        one = typer.Typer(add_completion=False)
        one.command(ep.name)(ep.load())
        return one
    install = f'pip install "{ep.dist.name}[{",".join(ep.extras)}]"'
    hint = f"`qarvd {ep.name}` needs packages that are not installed ({', '.join(missing)}): {install}"
    one = typer.Typer(add_completion=False, rich_markup_mode=None)  # "[serve]" is not markup
    anything = {"ignore_unknown_options": True, "allow_extra_args": True}  # explain, whatever the options
    # The listing in `qarvd --help` is rich markup, where "[serve]" would vanish unescaped.
    listed = f"not installed: {install}".replace("[", r"\[")
    one.command(ep.name, help=hint, short_help=listed, context_settings=anything)(lambda: fail(hint))
    return one


class Commands(TyperGroup):
    """The core's commands, then the plugins', each plugin imported only when it is listed or run."""

    def list_commands(self, ctx: typer.Context) -> list[str]:
        return [*super().list_commands(ctx), *(n for n in plugin_commands() if n not in self.commands)]

    def get_command(self, ctx: typer.Context, name: str):
        if name not in self.commands and name in plugin_commands():
            self.add_command(typer.main.get_command(load_plugin(plugin_commands()[name])), name)
        return super().get_command(ctx, name)


app = typer.Typer(
    cls=Commands,
    help="qarvd: a streaming world model, quantized with Q-ARVD.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def main() -> None:
    """qarvd: train, generate, evaluate and benchmark streaming world models."""


def guidance_option():
    return typer.Option(
        None, min=0.0, help="action guidance on the first denoising step (0 turns it off; default: the sampler's)"
    )


def sampler_kwargs(action_guidance: float | None) -> dict:
    return {} if action_guidance is None else {"action_guidance": action_guidance}


@app.command()
def train(
    preset: str = typer.Option("tiny-world", help="model preset to train"),
    steps: int = typer.Option(3000, help="optimizer steps (the learning-rate schedule's length)"),
    stop_after: int | None = typer.Option(None, help="stop after this many steps (schedule unchanged)"),
    batch: int = typer.Option(16, help="clips per step"),
    seed: int = typer.Option(0, help="seed for data, noise and init"),
    lr: float = typer.Option(6e-4, help="peak learning rate (cosine decay to 10%)"),
    warmup: int = typer.Option(200, help="linear warm-up steps"),
    policies: str = typer.Option("random_walk", help="action scripts of training clips, comma-separated (see world/)"),
    init_from: str | None = typer.Option(None, help="start from these weights (name or path): a fine-tune"),
    out: Path = typer.Option(Path("runs/tiny-world"), help="run directory: checkpoints, log, exported weights"),
    threads: int = typer.Option(0, help="torch threads (0: torch's default)"),
    compile: bool = typer.Option(True, help="torch.compile the training forward"),
):
    """Train a world preset on simulator clips; resumes from OUT if a checkpoint is there."""
    import torch

    from qarvd_core.model import PRESETS
    from qarvd_core.training import TrainConfig
    from qarvd_core.training import train as run_training

    if preset not in PRESETS:
        fail(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if threads:
        torch.set_num_threads(threads)
    try:
        cfg = TrainConfig(
            preset=preset,
            steps=steps,
            batch=batch,
            seed=seed,
            lr=lr,
            warmup=warmup,
            policies=tuple(p.strip() for p in policies.split(",") if p.strip()),
            init_from=init_from,
            compile=compile,
            stop_after=stop_after,
        )
        path = run_training(cfg, out)
    except ValueError as e:
        fail(str(e))
    typer.echo(f"weights: {path}")


def _load(model: str, dtype: str = "fp32", device: str = "cpu"):
    from qarvd_core.checkpoint import DTYPES, load_model

    if dtype not in DTYPES:
        fail(f"unknown dtype {dtype!r}; choose {' or '.join(DTYPES)}")
    try:
        return load_model(model, dtype=DTYPES[dtype], device=device)
    except ValueError as e:
        fail(str(e))


def device_option():
    return typer.Option(
        "auto",
        envvar="QARVD_DEVICE",
        help="where the model runs: auto (CUDA when available, else CPU), cpu, cuda or cuda:N",
    )


def _device(device: str) -> str:
    """`--device` resolved (`qarvd_core.runtime.resolve_device`), or the command fails saying why."""
    from qarvd_core import runtime

    try:
        return str(runtime.resolve_device(device))
    except ValueError as e:
        fail(str(e))


def dtype_option():
    return typer.Option("auto", help="auto (bf16 where the CPU runs it natively, else fp32), fp32 or bf16")


def compile_option():
    return typer.Option(None, "--compile/--no-compile", help="torch.compile the transformer blocks (default: by host)")


def kv_bits_option():
    return typer.Option(
        None,
        "--kv-bits",
        help="KV-cache bits: 8 or 4 for the whole cache, SINK,WINDOW (e.g. 8,4), auto (8,4: the measured trade-off), "
        "16: full precision; default: the checkpoint's, else full precision",
    )


def _set_kv_bits(net, kv_bits: str | None) -> None:
    """Streams of `net` store their KV cache as `--kv-bits` says (default: as its checkpoint says)."""
    if kv_bits is not None:
        net.kv_quant = _kv_config(kv_bits)


def _kv_config(kv_bits: str):
    from qarvd_core.quant.kv import KVQuantConfig

    try:
        return KVQuantConfig.parse(kv_bits)
    except ValueError as e:
        fail(str(e))


def kernels_option():
    return typer.Option(
        "auto", help="quantized models' integer GEMMs: auto (by device and CPU), onednn, fbgemm, int_mm or cuda"
    )


def _load_planned(
    model: str, dtype: str, compile_blocks: bool | None, kernels: str, max_autotune: bool = False, device: str = "auto"
):
    """Load `model` on `device` with the dtype, compile and kernels `qarvd_core.runtime.plan` resolves
    for it; the plan, and a warning if quantized layers measure slower than FP32 there, go to stderr."""
    from qarvd_core import runtime

    try:
        plan = runtime.plan(dtype, compile_blocks, kernels, device=_device(device), quantized=_is_quantized(model))
        plan.apply()
    except ValueError as e:
        fail(str(e))
    typer.echo(f"runtime: {plan.describe()}", err=True)
    net = _load(model, plan.dtype, plan.device)
    warning = runtime.speed_warning(net, net.args.tokens_per_frame * net.args.frames_per_chunk)
    if warning:
        typer.secho(f"warning: {warning}", err=True, fg=typer.colors.YELLOW)
    if plan.compile:
        net.compile_blocks(max_autotune)
    return net, plan, warning


def _is_quantized(model: str) -> bool:
    from qarvd_core.checkpoint import read_manifest, resolve_weights

    try:
        return read_manifest(resolve_weights(model)).get("format") == "qarvd-quantized"
    except ValueError:  # not a weights file with a manifest: loading it says what it is, or what is wrong
        return False


def _check_writable(path: Path, what: str) -> None:
    parent = path.resolve().parent
    if parent.exists() and not parent.is_dir():
        fail(f"cannot write {what} {path}: {parent} is not a directory")
    if not parent.is_dir():
        fail(f"cannot write {what} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        fail(f"cannot write {what} {path}: directory {parent} is not writable")


@app.command()
def generate(
    model: str = typer.Option(
        "tiny-world", help="shipped model name, path to .safetensors weights, or a Wan model card (.json)"
    ),
    prompt: str = typer.Option("islands", help="scene prompt: a biome name, or text for a text-to-video model"),
    seed: int = typer.Option(0, help="noise seed"),
    actions: str | None = typer.Option(
        None,
        help=f"action script, e.g. 'right*24,none*6'; at most {GENERATE_MAX_FRAMES} frames "
        f"(default: {GENERATE_ACTIONS}); not for models without actions",
    ),
    chunks: int | None = typer.Option(
        None, min=1, help=f"chunks to make, for models without actions (default {GENERATE_CHUNKS})"
    ),
    out: Path = typer.Option(Path("demo.mp4"), help="output H.264 MP4"),
    scale: int | None = typer.Option(
        None, min=1, max=16, help="nearest-neighbour upscaling of the MP4 (default: to at least 256 pixels high)"
    ),
    frames_dir: Path | None = typer.Option(None, help="also write every frame losslessly as DIR/000000.png, ..."),
    fps: int = typer.Option(16, min=1, max=120, help="frame rate of the MP4"),
    json_out: bool = typer.Option(False, "--json", help="print frames, fps and chunk latency as JSON"),
    action_guidance: float | None = guidance_option(),
    dtype: str = dtype_option(),
    compile_blocks: bool | None = compile_option(),
    kernels: str = kernels_option(),
    device: str = device_option(),
    kv_bits: str | None = kv_bits_option(),
):
    """Stream a video from a model: under an action script (frame i is generated under action i),
    or for a text-to-video model, `--chunks` chunks under its prompt."""
    import json
    import time

    import numpy as np

    from qarvd_core.sampling import ScriptRender, Stream
    from qarvd_core.video import write_mp4, write_pngs
    from qarvd_core.world.scripts import parse_actions

    try:
        script = parse_actions(actions or GENERATE_ACTIONS, GENERATE_MAX_FRAMES)
    except ValueError as e:
        fail(str(e))
    if out.suffix.lower() != ".mp4":
        fail(f"--out must end in .mp4, got {out}")
    _check_writable(out, "video")
    if frames_dir is not None:
        if frames_dir.exists() and any(frames_dir.iterdir()):
            fail(f"--frames-dir {frames_dir} exists and is not empty; give a new directory")
        _check_writable(frames_dir, "frames directory")
    net = _load_planned(model, dtype, compile_blocks, kernels, device=device)[0]
    _set_kv_bits(net, kv_bits)
    if net.args.n_actions and chunks is not None:
        fail(f"{model} is steered by actions: its action script (--actions) sets the length, not --chunks")
    if not net.args.n_actions and actions is not None:
        fail(f"{model} takes no actions: it is steered by its text prompt only; give --chunks instead of --actions")
    try:
        stream = Stream(net, prompt, seed, **sampler_kwargs(action_guidance))
    except ValueError as e:
        fail(str(e))
    if getattr(net, "parts", None) is not None:  # the one prompt is encoded: free the text encoder
        net.parts.text.release()

    chunk_ms = []

    def step(action):
        t0 = time.perf_counter()
        frames = stream.step(action)
        chunk_ms.append((time.perf_counter() - t0) * 1000)
        return frames

    if net.args.n_actions:
        render = ScriptRender(script, net.args.frames_per_chunk)
        while not render.done:
            render.add(step(render.next_actions()))
        video = render.video()
        made = len(render.chunks) * net.args.frames_per_chunk
    else:
        video = np.concatenate([step(None) for _ in range(chunks or GENERATE_CHUNKS)])
        made = len(video)
    write_mp4(video, out, fps=fps, scale=scale or max(1, 256 // video.shape[1]))
    if frames_dir is not None:
        tmp = frames_dir.with_name(f".{frames_dir.name}.part")
        shutil.rmtree(tmp, ignore_errors=True)
        write_pngs(video, tmp)
        if frames_dir.exists():
            frames_dir.rmdir()
        tmp.rename(frames_dir)
    gen_fps = made / (sum(chunk_ms) / 1000)
    if json_out:
        typer.echo(
            json.dumps(
                {
                    "frames": len(video),
                    "fps": gen_fps,
                    "chunk_ms": {"p50": float(np.percentile(chunk_ms, 50)), "p95": float(np.percentile(chunk_ms, 95))},
                }
            )
        )
    else:
        typer.echo(f"wrote {out} ({len(video)} frames, generated at {gen_fps:.1f} frames/s)")


@app.command("eval")
def evaluate_cmd(
    ctx: typer.Context,
    model: str = typer.Option(..., help="model to evaluate: name or weights path"),
    reference: str | None = typer.Option(None, help="reference model (e.g. the FP model) for PSNR/SSIM"),
    json_path: Path = typer.Option(..., "--json", help="output JSON; .md table and .png plots go beside it"),
    scenarios: int = typer.Option(8, min=1, help="held-out scenarios"),
    frames: int = typer.Option(48, min=6, help="frames per scenario"),
    drift_frames: int = typer.Option(600, min=30, help="frames of each long drift stream"),
    split: str = typer.Option("heldout", help="worlds to use: heldout, or calibration to choose between checkpoints"),
    action_guidance: float | None = guidance_option(),
    device: str = device_option(),
    prompts: Path | None = typer.Option(None, help="a text model's prompts, one a line (with --reference)"),
    chunks: int = typer.Option(3, min=1, help="chunks streamed per prompt (text models)"),
):
    """Quality on held-out worlds: vs a reference model and vs the simulator. A text model
    (a Wan card) is compared with --reference on --prompts, per chunk."""
    from qarvd_core.eval.evaluate import EvalConfig, evaluate, evaluate_prompts, write_report

    _check_writable(json_path, "report")
    device = _device(device)
    net = _load(model, device=device)
    ref = _load(reference, device=device) if reference else None
    examples: list = []
    if not net.args.n_prompts:
        if ref is None or prompts is None:
            fail(f"{model} is a text model: compare it with --reference on --prompts FILE")
        lines = [p.strip() for p in prompts.read_text().splitlines() if p.strip()]
        result = evaluate_prompts(net, ref, lines, chunks)
    else:
        if split not in ("heldout", "calibration"):
            fail(f"--split must be heldout or calibration, got {split!r}")
        cfg = EvalConfig(
            scenarios=scenarios,
            frames=frames,
            drift_frames=drift_frames,
            split=split,
            **sampler_kwargs(action_guidance),
        )
        result = evaluate(
            net, ref, cfg, lambda stage: typer.echo(f"eval: {stage}", err=True), revisit_examples=examples
        )
    result["model"], result["reference"], result["command"] = model, reference, command_line(ctx)
    title = f"qarvd eval: {model}" + (f" vs {reference}" if reference else "")
    paths = write_report(result, json_path, title, examples)
    typer.echo(json_path.with_suffix(".md").read_text())
    typer.echo("wrote " + ", ".join(map(str, paths)))


@app.command()
def bench(
    model: str = typer.Option("tiny-world", help="model name or weights path"),
    json_path: Path | None = typer.Option(None, "--json", help="write the result as JSON here"),
    chunks: int = typer.Option(40, min=1, help="timed chunks"),
    warmup: int = typer.Option(5, min=0, help="untimed chunks first"),
    threads: int = typer.Option(0, min=0, help="torch threads (0: torch's default)"),
    dtype: str = dtype_option(),
    profile: bool = typer.Option(False, help="also report the share of time per op group"),
    sessions: int = typer.Option(1, min=1, help="streams stepped together in one batched pass, as the server does"),
    action_guidance: float | None = guidance_option(),
    compile_blocks: bool | None = compile_option(),
    max_autotune: bool = typer.Option(
        False, help="with --compile: frozen weights and AMX GEMM templates (faster; compiles take minutes)"
    ),
    kernels: str = kernels_option(),
    device: str = device_option(),
    kv_bits: str | None = kv_bits_option(),
):
    """Streaming speed: time per chunk (p50/p95) and frames per second, and the host and kernels that ran."""
    import contextlib
    import json

    import torch

    from qarvd_core.eval.bench import bench_stream, profile_compiled_kernels

    if json_path is not None:
        _check_writable(json_path, "result")
    if threads:
        torch.set_num_threads(threads)
    if max_autotune and not compile_blocks:
        fail("--max-autotune needs --compile")
    net, plan, warning = _load_planned(model, dtype, compile_blocks, kernels, max_autotune, device)
    _set_kv_bits(net, kv_bits)
    with profile_compiled_kernels() if profile and plan.compile else contextlib.nullcontext():
        result = bench_stream(
            net,
            chunks=chunks,
            warmup=warmup,
            profile=profile,
            sessions=sessions,
            **sampler_kwargs(action_guidance),
        )
    result.update(model=model, compiled=plan.compile, max_autotune=max_autotune and plan.compile)
    result.update(plan=plan.reasons, warning=warning)
    host = result["host"]
    summary = f"kernels {result['kernels']}, dtype {result['dtype']}, compiled {plan.compile}"
    typer.echo(f"host: {host['cpu']}, torch capability {host['capability']}; {summary}", err=True)
    text = json.dumps(result, indent=2)
    if json_path is not None:
        json_path.write_text(text + "\n")
    typer.echo(text)


@app.command(
    epilog="\n\n".join(["Methods and recipes for --method:", *(f"{n}: {r.about}" for n, r in RECIPES.items())])
)
def quantize(
    model: str = typer.Option("tiny-world", help="base model: name, weights path or Wan model card (.json)"),
    method: str = typer.Option("qarvd", help="a method, or a recipe (a method with preset options, see below)"),
    w_bits: int = typer.Option(8, help="weight bits, 2..8"),
    a_bits: int = typer.Option(8, help="activation bits, 2..8"),
    out: Path = typer.Option(..., help="output checkpoint NAME.safetensors (NAME.json is written beside it)"),
    calib_rollouts: int = typer.Option(16, min=1, help="calibration rollouts (calibration split)"),
    calib_chunks: int = typer.Option(7, min=2, help="chunks per calibration rollout (7 = 21 latent frames)"),
    prompts: Path | None = typer.Option(
        None, help="a text model's calibration prompts, one a line: one rollout per prompt (--calib-rollouts unused)"
    ),
    option: list[str] = typer.Option(
        [], "--option", "-o", help="method option KEY=VALUE (JSON value), repeatable; overrides the recipe's"
    ),
    evaluate: bool = typer.Option(True, help="measure PSNR/SSIM/action accuracy vs the base and store them"),
    device: str = device_option(),
    kv_bits: str | None = typer.Option(
        None,
        "--kv-bits",
        help="KV-cache bits its streams use, saved in the checkpoint (and measured by --evaluate): "
        "8, 4, SINK,WINDOW (e.g. 8,4), auto (8,4) or 16; default: full precision",
    ),
):
    """Quantize a model and write a versioned checkpoint usable wherever a model name is."""
    import json

    from qarvd_core.checkpoint import save_quantized
    from qarvd_core.eval.evaluate import EvalConfig, quantization_metrics_on_prompts
    from qarvd_core.eval.evaluate import evaluate as run_eval
    from qarvd_core.quant import CalibrationSet, config_from_dict
    from qarvd_core.quant import quantize as run_quantize

    options = {"method": method, "w_bits": w_bits, "a_bits": a_bits}
    for item in option:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"--option {item!r} must look like KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    try:
        config = config_from_dict(options)
    except (ValueError, TypeError) as e:
        fail(str(e))
    if out.suffix != ".safetensors":
        fail(f"--out must end in .safetensors, got {out}")
    kv_quant = None if kv_bits is None else _kv_config(kv_bits)
    _check_writable(out, "checkpoint")
    base = _load(model, device=_device(device))  # calibration rollouts run there; captured activations on the CPU
    try:
        if prompts is not None:
            calib = CalibrationSet.from_prompts(prompts.read_text().splitlines(), chunks=calib_chunks)
        else:
            calib = CalibrationSet(rollouts=calib_rollouts, chunks=calib_chunks)
        calib.check(base)
    except (OSError, ValueError) as e:
        fail(str(e))
    qmodel = run_quantize(base, config, calib)
    qmodel.kv_quant = kv_quant if kv_quant is not None and kv_quant.enabled else None
    metrics = None
    if evaluate and not base.args.n_prompts:
        typer.echo("evaluating against the base model on the calibration prompts, unseen noise", err=True)
        metrics = quantization_metrics_on_prompts(qmodel, base, list(calib.prompts))
    elif evaluate:
        typer.echo("evaluating against the base model on held-out scenarios", err=True)
        r = run_eval(qmodel, base, EvalConfig(scenarios=4, frames=24, drift_frames=0))
        metrics = {
            k: r[k]
            for k in ("psnr_db_mean", "ssim_mean", "action_accuracy", "reference_action_accuracy", "psnr_db_per_chunk")
        }
        metrics["protocol"] = "qarvd eval, 4 held-out scenarios x 24 frames, simulate mode"
    save_quantized(qmodel, out, model, metrics)
    typer.echo(f"wrote {out}" + (f" (PSNR vs base {metrics['psnr_db_mean']:.2f} dB)" if metrics else ""))


@app.command()
def inspect(path: Path = typer.Argument(..., help="a quantized checkpoint (.safetensors)")):
    """Print a quantized checkpoint's manifest readably."""
    from qarvd_core.checkpoint import is_quantized_manifest, read_manifest
    from qarvd_core.quant.linear import ACT_MODES

    try:
        m = read_manifest(path)
    except ValueError as e:
        fail(str(e))
    if not is_quantized_manifest(m):
        fail(f"{path} is not a quantized checkpoint")
    q = m["quantization"]
    cfg = q["config"]
    typer.echo(f"{path}  (format {m['format']} v{m['format_version']}, created {m['created']})")
    typer.echo(f"base model   {m['base_model']['id']}  sha256 {m['base_model']['sha256'][:16]}…")
    typer.echo(f"method       {cfg['method']}  W{cfg['w_bits']}A{cfg['a_bits']}  kept FP: {', '.join(cfg['keep_fp'])}")
    others = {k: v for k, v in cfg.items() if k not in ("method", "w_bits", "a_bits", "keep_fp")}
    if others:
        typer.echo("options      " + ", ".join(f"{k}={v}" for k, v in others.items()))
    if "card" in m:  # a Wan model: where its text encoder and VAE are loaded from
        card = m["card"]
        sampling = card.get("sampling", card.get("recipe"))  # `recipe` in manifests before sampling presets
        typer.echo(f"card         sampling {sampling}, text encoder {card['text_encoder']}, VAE {card['vae']}")
    typer.echo(f"calibration  {q['calibration']}")
    if q.get("frame_weights"):
        typer.echo("frame weights " + " ".join(f"{w:.3f}" for w in q["frame_weights"]))
    layers = q["layers"]
    dual = {n: v for n, v in layers.items() if v["kind"] == "dual"}
    # Checkpoints from before act_mode was recorded per layer are all static.
    modes = sorted({v.get("act_mode", "static") for v in layers.values()})
    acts = "/".join(ACT_MODES.get(mode, mode) for mode in modes)
    typer.echo(f"layers       {len(layers)} quantized, {len(dual)} dual-scale, activations {acts}")
    for n, v in dual.items():
        typer.echo(f"  {n:32s} {v['outliers']:4d} of {v['in']} input columns as outliers")
    typer.echo(f"file         {path.stat().st_size / 1e6:.2f} MB, sha256 {m['sha256'][:16]}…")
    if m.get("evaluation"):
        e = m["evaluation"]
        typer.echo(
            f"evaluation   PSNR {e['psnr_db_mean']:.2f} dB, SSIM {e['ssim_mean']:.4f}, action accuracy "
            f"{e['action_accuracy']:.3f} (base {e['reference_action_accuracy']:.3f})"
        )


analyze_app = typer.Typer(
    help="Measure the paper's observations: chunk sensitivity (C1), outlier map (C2).", no_args_is_help=True
)
app.add_typer(analyze_app, name="analyze")


@analyze_app.command("sensitivity")
def analyze_sensitivity(
    ctx: typer.Context,
    model: str = typer.Option("tiny-world", help="model name or weights path"),
    w_bits: int = typer.Option(4, help="weight bits"),
    a_bits: int = typer.Option(8, help="activation bits"),
    rollouts: int = typer.Option(8, min=1, help="calibration prompts averaged over"),
    chunks: int = typer.Option(7, min=2, help="chunks per rollout"),
    json_path: Path = typer.Option(Path("sensitivity.json"), "--json", help="output JSON (PNG beside it)"),
    device: str = device_option(),
):
    """C1: MSE of the final video when only chunk k is quantized, and the S1 frame weights."""
    from qarvd_core.quant import CalibrationSet, QArvdConfig
    from qarvd_core.quant.analysis import sensitivity, write_json_and_plot

    try:
        QArvdConfig(w_bits=w_bits, a_bits=a_bits)
    except ValueError as e:
        fail(str(e))
    _check_writable(json_path, "result")
    net = _load(model, device=_device(device))
    result = sensitivity(net, w_bits, a_bits, CalibrationSet(rollouts=min(rollouts, 4), chunks=chunks), rollouts)
    result["model"], result["command"] = model, command_line(ctx)
    paths = write_json_and_plot(result, json_path, "sensitivity")
    typer.echo("chunk MSE     " + " ".join(f"{e:.2e}" for e in result["chunk_mse"]))
    typer.echo("frame weights " + " ".join(f"{w:.3f}" for w in result["frame_weights"]))
    typer.echo("wrote " + ", ".join(map(str, paths)))


@analyze_app.command("outliers")
def analyze_outliers(
    ctx: typer.Context,
    model: str = typer.Option("tiny-world", help="model name or weights path"),
    json_path: Path = typer.Option(Path("outliers.json"), "--json", help="output JSON (PNG beside it)"),
    device: str = device_option(),
):
    """C2: how many outlier input columns each block layer has (what S2 isolates)."""
    from qarvd_core.quant.analysis import outlier_map, write_json_and_plot

    _check_writable(json_path, "result")
    result = outlier_map(_load(model, device=_device(device)))
    result["model"], result["command"] = model, command_line(ctx)
    paths = write_json_and_plot(result, json_path, "outliers")
    for r in result["layers"]:
        if r["outliers"]:
            typer.echo(f"{r['layer']:32s} {r['outliers']:4d} / {r['in']}")
    typer.echo(f"{result['dual_scale_layers']} of {result['total_layers']} block layers get dual scales")
    typer.echo("wrote " + ", ".join(map(str, paths)))
