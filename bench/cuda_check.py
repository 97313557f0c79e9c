"""CUDA check of the worker steps: each step on the GPU in bfloat16, resumed runs, and GPU throughput.

    python bench/cuda_check.py --require-cuda            # on a CUDA machine (expected ~2-3 min on one H200)
    python bench/cuda_check.py --device cpu --quick      # the same checks at tiny sizes on a CPU (10-30 s)
    python bench/cuda_check.py --require-cuda --scale    # and train_pm + ppo on a 0.53B Llama-shaped model

The worker steps are tested on CPU in float32; this runs the other path
(``device=auto`` is CUDA when present, ``dtype=auto`` bfloat16 there) in
one process, with models built here (no downloads):

1. Setup: a byte-level BPE tokenizer trained on the HH-RLHF sample
   (``tests/data/hh-rlhf``), a GPT-2 "step" policy (4 layers x 256, dropout
   0.1) and a "throughput" policy (12 x 768), written with save_pretrained
   and loaded by the steps through ``workers.common.modeling`` like a user's model.
2. Steps on ``--device`` with ``--dtype``: sft, sample, train_pm (train and
   test PM on the HH sample), ppo (value head; LoRA; on CUDA also float32
   weights), evaluate (PPO's policy against the initial one, both PMs, the
   demo world's gold function) and best_of_n. Per step: ok, wall seconds,
   the device and dtype of every model it loaded (recorded at
   ``workers.common.modeling``'s loader), whether its key metrics are finite, and
   peak CUDA memory (``torch.cuda.max_memory_allocated``). For ppo also the
   fraction of policy weights that changed (bfloat16 weights round away
   updates much smaller than their own size).
3. Resume: a train_pm run (dropout on, so the CUDA RNG state matters) and a
   ppo run stopped part-way (``max_steps_this_run`` / ``max_rollouts_this_run``,
   what a kill leaves behind) and run again to the end, against an
   uninterrupted run: max abs weight difference and
   ||resumed - whole|| / ||whole - initial||. Bitwise equal on a CPU; on a
   GPU close but not bitwise (atomic adds in some backward kernels), so a
   second uninterrupted run measures how far two runs drift apart anyway.
   ok when the resumed run is within ``--resume-tolerance`` or 3x that drift
   (a resume that lost the data position, RNG or optimizer state lands
   much further away).
4. Throughput on the 12 x 768 policy: sampling tokens/s, ``workers.sample``
   against a per-prompt ``model.generate`` loop (``bench/sampling.py``'s
   peer, same device and dtype), median of alternating repeats after a
   warm-up; and PPO episodes/s (median over rollouts after the first).

5. Scale (``--scale``, off by default; ``--scale-only`` skips sections 2-4):
   train_pm and ppo on a randomly initialised Llama-shaped model
   (``LlamaConfig``: 20 layers x 1536, 12 heads, 4 key/value heads (GQA),
   intermediate 4096, the tokenizer above: 0.53B parameters; ``--scale-size``
   sets it), written in bfloat16 with save_pretrained and loaded by the steps
   like a user's model, with ``dtype=bfloat16`` (float32 master weights,
   bfloat16 autocast; PPO's reference and PM held in bfloat16). train_pm's
   PM is PPO's PM. Per step: tokens/s, model FLOPs utilisation and peak CUDA
   memory. Tokens are real ones (no padding), counted in the timed part only:
   train_pm runs a short warm-up run first, then the timed run, whose
   ``perf/tokens_per_s`` counts the packed ``[prompt | A | B]`` tokens of its
   optimizer steps (validation and saving excluded); ppo's first rollout is
   the warm-up, and each later rollout counts its prompts' and responses'
   tokens over its own wall time (``charts/episodes_per_s``). The PPO run
   stops one rollout short of its total, so it writes neither a checkpoint nor
   the policy (gigabytes of optimizer state; disk time is not what this
   measures). MFU is model FLOPs per second over the device's peak dense
   bfloat16 FLOP/s (``PEAK_BF16_FLOPS`` by device name, or ``--peak-tflops``):
   training forward + backward costs 6 N per token, an inference-only pass
   2 N per token (Kaplan et al. 2020, sec. 2.1; attention's score FLOPs and
   the input embedding lookup left out, so N counts every parameter but the
   input embedding: the policy's LM head is in, a PM has none). Per real token
   T of a rollout PPO does: generation (2 N_policy; prefill and decode), the
   policy's and value head's scoring pass (2 N_policy), the reference
   (2 N_policy), the PM (2 N_pm) and ``ppo_epochs`` training passes
   (6 N_policy each); train_pm does 6 N_pm per packed token. Without a known
   peak, MFU is null and the model FLOP/s are still reported.

Progress lines go to stdout; the last line is one JSON object with an
``ok`` flag per step and overall, the numbers, torch/transformers versions
and the device name. With ``OUT`` set it is also written to
``$OUT/cuda_check.json``, after every section, so a run killed part-way
leaves what it had. Sections still to run when ``--budget-s`` has passed are
skipped (and say so). Exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model is a local directory; never wait on a network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SIZES = {
    # step: the policy every step check trains and samples; throughput: the model the GPU numbers are about
    "full": {
        "vocab": 8192, "step": (4, 256, 4), "throughput": (12, 768, 12), "prompts": 64, "comparisons": None,
        "sft_steps": 30, "pm_steps": 40, "batch": 16, "max_length": 256, "max_prompt_tokens": 96,
        "new_tokens": 48, "ppo_rollouts": 4, "rollout": 32, "mini": 8, "eval_prompts": 32,
        "resume_pm_steps": 12, "resume_pm_stop": 5,
        "tp_prompts": 16, "tp_new_tokens": 64, "tp_repeats": 2, "tp_ppo_rollouts": 4, "tp_rollout": 64, "tp_mini": 16,
        "scale_model": "20x1536x12x4x4096", "scale_max_length": 512, "scale_pm_batch": 32, "scale_pm_warmup": 2,
        "scale_pm_steps": 20, "scale_rollout": 64, "scale_mini": 16, "scale_rollouts": 3, "scale_new_tokens": 64,
    },
    "quick": {
        "vocab": 1024, "step": (2, 64, 2), "throughput": (2, 128, 2), "prompts": 8, "comparisons": 120,
        "sft_steps": 4, "pm_steps": 4, "batch": 8, "max_length": 128, "max_prompt_tokens": 48,
        "new_tokens": 8, "ppo_rollouts": 2, "rollout": 8, "mini": 4, "eval_prompts": 8,
        "resume_pm_steps": 6, "resume_pm_stop": 2,
        "tp_prompts": 4, "tp_new_tokens": 16, "tp_repeats": 2, "tp_ppo_rollouts": 2, "tp_rollout": 8, "tp_mini": 4,
        "scale_model": "2x64x4x2", "scale_max_length": 128, "scale_pm_batch": 8, "scale_pm_warmup": 1,
        "scale_pm_steps": 3, "scale_rollout": 8, "scale_mini": 4, "scale_rollouts": 1, "scale_new_tokens": 16,
    },
}
GOLD = "workers.demo_world:gold_score"
PEAK_BF16_FLOPS = (
    # Dense bfloat16 tensor-core peaks from the vendors' data sheets, matched in this order against
    # torch.cuda.get_device_name (so "H100 PCIe" before "H100", "L40S" and "L40" before "L4").
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("GH200", 989e12), ("H200", 989e12), ("H100", 989e12),
    ("H800", 989e12), ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12),
    ("L4", 121e12),
)


# -- bookkeeping ---------------------------------------------------------------------


class Check:
    """The report: sections filled in as they run, printed and saved as one JSON object."""

    def __init__(self, out_path: Path | None, budget_s: float):
        self.start = time.perf_counter()
        self.out_path = out_path
        self.budget_s = budget_s
        self.report: dict[str, Any] = {"ok": False, "steps": {}, "resume": {}, "throughput": {}, "scale": {}}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def say(self, text: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {text}", flush=True)

    def over_budget(self) -> bool:
        return self.elapsed() > self.budget_s

    def save(self) -> None:
        self.report["wall_s"] = round(self.elapsed(), 1)
        checks = [*self.report["steps"].values(), *self.report["resume"].values(), *self.report["throughput"].values(),
                  *self.report["scale"].values()]
        self.report["ok"] = bool(checks) and all(c.get("ok") for c in checks) and "error" not in self.report
        if self.out_path is not None:
            self.out_path.parent.mkdir(parents=True, exist_ok=True)
            self.out_path.write_text(json.dumps(self.report, indent=1, default=_plain) + "\n")


def _plain(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def _round(value: Any) -> Any:
    """A float to 6 significant digits (non-finite ones as strings, which JSON can hold)."""
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else str(value)
    return value


def finite(metrics: dict[str, Any], keys: list[str]) -> tuple[bool, list[str]]:
    """Whether every metric in ``keys`` is a finite number; the keys that are not."""
    bad = [k for k in keys if not (isinstance(metrics.get(k), (int, float)) and math.isfinite(metrics[k]))]
    return not bad, bad


class LoadRecorder:
    """The (directory, device, dtype) of every model a step loads.

    Every step loads its models through ``workers.common.modeling._load`` (causal LMs,
    trunks, PMs), so wrapping it shows where each model actually lives,
    whatever the config asked for.
    """

    def __init__(self):
        import workers.common.modeling as modeling

        self.loads: list[tuple[str, str, str]] = []
        original = modeling._load

        def recording(cls, path, **kwargs):
            model = original(cls, path, **kwargs)
            p = next(model.parameters())
            name = "/".join(Path(path).parts[-2:])
            self.loads.append((name, str(p.device), str(p.dtype).removeprefix("torch.")))
            return model

        modeling._load = recording


# -- inputs ----------------------------------------------------------------------------


def _load_bench_sampling():
    spec = importlib.util.spec_from_file_location("bench_sampling", ROOT / "bench" / "sampling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def build_inputs(work: Path, size: dict, sampling) -> dict[str, Any]:
    """Tokenizer, the two policies and the data files, under ``work``."""
    from transformers import AutoModelForCausalLM

    from tests.workers.builders import hh_comparisons
    from workers.common.testing import build_tiny_model, build_tokenizer, count_parameters

    comparisons = hh_comparisons(size["comparisons"])
    prompts = sampling.hh_prompts(max(size["prompts"], size["eval_prompts"], size["tp_prompts"]) * 2)
    texts = [c["prompt"] + c["response_a"] for c in comparisons] + [c["response_b"] for c in comparisons]
    tokenizer = build_tokenizer(texts, vocab_size=size["vocab"], model_max_length=10**6)
    models = {}
    for name in ("step", "throughput"):
        layers, hidden, heads = size[name]
        path = build_tiny_model(work / f"policy-{name}", tokenizer=tokenizer, n_layer=layers, hidden_size=hidden,
                                n_head=heads, max_positions=512, dropout=0.1 if name == "step" else 0.0, seed=0)
        params = count_parameters(AutoModelForCausalLM.from_pretrained(path, use_safetensors=True))
        models[name] = {"path": str(path), "layers": layers, "hidden": hidden, "parameters": params}
    train_prompts, eval_prompts = prompts[: size["prompts"]], prompts[size["prompts"] :][: size["eval_prompts"]]
    # sft refuses a response that cannot fit max_length next to a prompt; keep the chosen responses that fit easily
    encoded = tokenizer([c["response_a"] for c in comparisons], add_special_tokens=False)["input_ids"]
    lengths = [len(ids) for ids in encoded]
    sft_records = [{"prompt": c["prompt"], "response": c["response_a"]}
                   for c, n in zip(comparisons, lengths) if n < size["max_length"] // 2]
    return {
        "models": models,
        "comparisons": write_jsonl(work / "comparisons.jsonl", comparisons),
        "sft": write_jsonl(work / "sft.jsonl", sft_records),
        "prompts": write_jsonl(work / "prompts.jsonl",
                               [{"id": f"p{i}", "prompt": p} for i, p in enumerate(train_prompts)]),
        "eval_prompts": write_jsonl(work / "eval_prompts.jsonl",
                                    [{"id": f"e{i}", "prompt": p} for i, p in enumerate(eval_prompts)]),
        "tp_prompts": prompts[: size["tp_prompts"]],
        "n_comparisons": len(comparisons),
    }


def random_pm(policy_dir: str, out: Path) -> str:
    """A PM directory with the policy's trunk and a random head (only when train_pm failed, so PPO still runs)."""
    import torch

    from workers.common.modeling import load_tokenizer, load_trunk
    from workers.common.pm import PreferenceModel
    from workers.common.score import save_pm

    trunk = load_trunk(policy_dir, device=torch.device("cpu"), dtype=torch.float32)
    head = PreferenceModel.new_head(trunk.config.hidden_size, std=0.02, seed=1)
    save_pm(PreferenceModel(trunk, head), load_tokenizer(policy_dir), out,
            spec={"max_length": 512, "append_eos": True, "base_model": policy_dir})
    return str(out)


# -- weights -----------------------------------------------------------------------------


def _tensors(directory: str | Path) -> dict[str, Any]:
    """The tensors of a model or PM directory as saved (trunk keys without "transformer.", plus head.*)."""
    from safetensors.torch import load_file

    root = Path(directory)
    out = {k.removeprefix("transformer."): v for k, v in load_file(str(root / "model.safetensors")).items()}
    if (root / "pm_head.safetensors").is_file():
        out.update({f"head.{k}": v for k, v in load_file(str(root / "pm_head.safetensors")).items()})
    return out


def _initial_like(init: dict[str, Any], trained: dict[str, Any]) -> dict[str, Any]:
    """The initial weights rounded to the trained run's dtype (a bfloat16 run starts from rounded weights)."""
    return {k: v.to(trained[k].dtype) for k, v in init.items() if k in trained and v.shape == trained[k].shape}


def weight_gap(a_dir: str, b_dir: str, initial_dir: str) -> dict[str, Any]:
    """Max abs difference of two runs' weights, and ||a - b|| / ||a - initial|| over the shared keys."""
    a, b = _tensors(a_dir), _tensors(b_dir)
    init = _initial_like(_tensors(initial_dir), a)
    keys = sorted(set(a) & set(b))
    max_abs = max((a[k].float() - b[k].float()).abs().max().item() for k in keys)
    diff = math.sqrt(sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in keys))
    moved = math.sqrt(sum(float((a[k].float() - init[k].float()).pow(2).sum()) for k in keys if k in init))
    return {"max_abs_diff": max_abs, "rel_diff": diff / moved if moved else (0.0 if diff == 0 else math.inf),
            "update_norm": moved, "keys": len(keys)}


def changed_fraction(after_dir: str, before_dir: str) -> dict[str, Any]:
    """Fraction of weight elements training changed (from the initial weights rounded to the saved dtype)."""
    after = _tensors(after_dir)
    before = _initial_like(_tensors(before_dir), after)
    total = sum(before[k].numel() for k in before)
    changed = sum(int((after[k] != before[k]).sum()) for k in before)
    return {"weights_changed_fraction": changed / total,
            "weights_max_update": max((after[k].float() - before[k].float()).abs().max().item() for k in before),
            "saved_dtype": str(next(iter(after.values())).dtype).removeprefix("torch.")}


# -- running a step ----------------------------------------------------------------------


def run_step(check: Check, recorder: LoadRecorder, name: str, fn: Callable[[], dict[str, Any]], *,
             device, dtype, master_weights: bool = False, frozen_in_dtype: bool = False,
             section: str = "steps") -> dict[str, Any] | None:
    """Run ``fn`` (which returns a record with at least "ok"), timing it and noting models and peak memory.

    Every model the step loads must be on ``device`` in ``dtype``, or in float32 for a step that keeps
    float32 master weights and computes in ``dtype`` under autocast (``master_weights``: sft, train_pm).
    ``frozen_in_dtype`` (ppo): trained weights in float32, frozen models (reference, PMs, a LoRA
    policy's base) in ``dtype``; each load must be one of the two.
    """
    import torch

    weights = torch.float32 if master_weights else dtype
    allowed = {str(weights).removeprefix("torch.")}
    if frozen_in_dtype:
        allowed |= {"float32", str(dtype).removeprefix("torch.")}

    record: dict[str, Any] = {"ok": False}
    check.report[section][name] = record
    if check.over_budget():
        record["skipped"] = f"time budget ({check.budget_s:.0f} s) spent"
        check.say(f"{name}: skipped, {record['skipped']}")
        check.save()
        return None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    recorder.loads.clear()
    start = time.perf_counter()
    try:
        record.update(fn())
    except Exception as exc:  # noqa: BLE001 - every step is reported, whatever fails
        record["ok"] = False
        record["error"] = f"{type(exc).__name__}: {exc}"[:800]
        traceback.print_exc()
    record["wall_s"] = round(time.perf_counter() - start, 2)
    loads = sorted(set(recorder.loads))
    record["loaded"] = [f"{n}:{d}:{t}" for n, d, t in loads]
    if loads:
        record["on_device"] = all(torch.device(d).type == device.type for _, d, _ in loads)
        record["dtype_as_expected"] = all(t in allowed for _, _, t in loads)
        record["ok"] = record["ok"] and record["on_device"] and record["dtype_as_expected"]
    if device.type == "cuda":
        record["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    record["expected"] = f"{device.type}:{'|'.join(sorted(allowed))}" + (
        f" (autocast {str(dtype).removeprefix('torch.')})" if allowed != {str(dtype).removeprefix("torch.")} else "")
    status = "ok" if record["ok"] else "FAILED"
    extra = f" peak {record['peak_cuda_mb']} MiB" if "peak_cuda_mb" in record else ""
    check.say(f"{name}: {status} in {record['wall_s']} s, loaded {', '.join(record['loaded']) or 'nothing'}{extra}"
              + (f" -- {record['error']}" if "error" in record else ""))
    check.save()
    return record


def summary(metrics: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    ok, bad = finite(metrics, keys)
    out = {"ok": ok, "finite": ok, "metrics": {k: _round(metrics.get(k)) for k in keys}}
    if bad:
        out["not_finite"] = bad
    return out


# -- main ------------------------------------------------------------------------------------


def environment(device) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                           "device": str(device)}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        env["bf16_supported"] = torch.cuda.is_bf16_supported()
        env["device_memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    else:
        env["device_name"] = platform.processor() or platform.machine()
    for dist in ("transformers", "tokenizers", "huggingface_hub", "safetensors", "peft", "accelerate", "numpy"):
        try:
            env[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            env[dist] = None
    import transformers

    env["transformers_from"] = str(Path(transformers.__file__).parents[1])
    return env


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a CPU test of this script)")
    parser.add_argument("--require-cuda", action="store_true", help="stop at once unless --device resolves to CUDA")
    parser.add_argument("--work", default=str(ROOT / "bench" / "results" / "cuda_check"))
    parser.add_argument("--budget-s", type=float, default=360.0, help="skip the sections still to run after this")
    parser.add_argument("--resume-tolerance", type=float, default=0.05,
                        help="||resumed - whole|| / ||whole - initial|| that always counts as resumed "
                             "(more is allowed up to 3x the difference between two uninterrupted runs)")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--repeats", type=int, default=None, help="throughput repeats per side (default 2)")
    parser.add_argument("--scale", action="store_true",
                        help="also train_pm and ppo on a Llama-shaped model: tokens/s, MFU, peak memory")
    parser.add_argument("--scale-only", action="store_true", help="the scale section alone (implies --scale)")
    parser.add_argument("--scale-size", default=None,
                        help="the scale model as LAYERSxHIDDEN[xHEADS[xKV_HEADS[xINTERMEDIATE]]] "
                             "(default 20x1536x12x4x4096; with --quick 2x64x4x2)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak dense bfloat16 TFLOP/s for MFU (default: looked up by device name)")
    args = parser.parse_args()
    out_path = Path(os.environ["OUT"]) / "cuda_check.json" if os.environ.get("OUT") else None
    check = Check(out_path, args.budget_s)
    check.report["args"] = vars(args)
    # A TERM (``timeout``'s default signal) ends the run like Ctrl-C: the report is still saved and printed.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _main(args, check)
    except KeyboardInterrupt:
        check.report["error"] = f"interrupted after {check.elapsed():.0f} s"
        return 130
    except Exception as exc:  # noqa: BLE001 - say what broke in the JSON too
        traceback.print_exc()
        check.report["error"] = f"{type(exc).__name__}: {exc}"[:1500]
        return 1
    finally:
        check.save()
        print(json.dumps(check.report, default=_plain), flush=True)


def _main(args, check: Check) -> int:
    import transformers

    transformers.logging.set_verbosity_error()
    from workers.common.runtime import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    check.report["env"] = environment(device)
    env = check.report["env"]
    check.say(f"torch {env['torch']} (CUDA {env['torch_cuda']}), transformers {env['transformers']} from "
              f"{env['transformers_from']}, device {device} ({env['device_name']}), dtype {dtype}")
    if args.require_cuda and device.type != "cuda":
        check.report["error"] = f"--require-cuda: --device {args.device} is {device} here (torch sees no CUDA device)"
        check.say(check.report["error"])
        return 1
    size = dict(SIZES["quick" if args.quick else "full"])
    if args.repeats is not None:
        size["tp_repeats"] = args.repeats
    if args.scale_size is not None:
        size["scale_model"] = args.scale_size
    scale_shape(size["scale_model"])  # a malformed --scale-size stops here, before any work
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sampling = _load_bench_sampling()
    inputs = build_inputs(work, size, sampling)
    models = inputs["models"]
    check.report["models"] = {k: {x: v[x] for x in ("layers", "hidden", "parameters")} for k, v in models.items()}
    check.report["data"] = {"comparisons": inputs["n_comparisons"], "prompts": size["prompts"]}
    check.say(f"setup: tokenizer ({size['vocab']} tokens), policies "
              + ", ".join(f"{k} {v['layers']}x{v['hidden']} ({v['parameters'] / 1e6:.1f}M)" for k, v in models.items())
              + f", {inputs['n_comparisons']} HH comparisons")
    check.save()
    recorder = LoadRecorder()
    policy = inputs["models"]["step"]["path"]
    common = {"device": args.device, "dtype": args.dtype, "progress": False}
    state: dict[str, str] = {}

    if args.scale_only:
        check.say("--scale-only: sections 2-4 skipped")
    else:
        steps(check, recorder, args, size, inputs, policy, common, state, device, dtype)
        resume(check, recorder, args, size, inputs, policy, common, state, device, dtype)
        if args.skip_throughput:
            check.report["throughput"]["skipped"] = {"ok": True, "skipped": "--skip-throughput"}
        else:
            throughput(check, recorder, args, size, inputs, common, state, device, dtype, sampling)
    if args.scale or args.scale_only:
        scale(check, recorder, args, size, inputs, device)
    check.save()
    check.say("all checks passed" if check.report["ok"] else "SOME CHECKS FAILED")
    return 0 if check.report["ok"] else 1


def steps(check, recorder, args, size, inputs, policy, common, state, device, dtype) -> None:
    """Section 2: every step once on the device."""
    import torch

    work = Path(args.work)
    on_cuda = device.type == "cuda"

    def sft():
        from workers.sft import SFTConfig, run

        result = run(SFTConfig(model_path=policy, dataset_path=inputs["sft"], output_dir=str(work / "sft"),
                               batch_size=size["batch"], max_steps=size["sft_steps"], max_length=size["max_length"],
                               learning_rate=1e-4, checkpoint_every=0, log_every=1, **common))
        return summary(result.metrics, ["train/loss_last", "perf/tokens_per_s"])

    def sample():
        from workers.sample import SampleConfig, run

        result = run(SampleConfig(policies={"p0": policy}, prompts_path=inputs["prompts"],
                                  output_dir=str(work / "sample"),
                                  num_samples=4, max_new_tokens=size["new_tokens"], temperature=1.0, top_p=0.9,
                                  max_prompt_tokens=size["max_prompt_tokens"], batch_size=64, **common))
        out = summary(result.metrics, ["perf/tokens_per_s", "samples/p0/mean_logprob",
                                       "samples/p0/mean_response_tokens", "samples/p0/eos_fraction"])
        expected = 4 * size["prompts"]
        if result.metrics["samples/responses"] != expected:
            out.update(ok=False, error=f"{result.metrics['samples/responses']} responses, expected {expected}")
        return out

    def train_pm():
        from workers.train_pm import TrainPMConfig, run

        result = run(TrainPMConfig(model_path=policy, dataset_path=inputs["comparisons"],
                                   output_dir=str(work / "train_pm"),
                                   two_pms=True, heldout_fraction=0.1, batch_size=size["batch"], eval_batch_size=64,
                                   learning_rate=1e-4, max_steps=size["pm_steps"], max_length=size["max_length"],
                                   checkpoint_every=0, **common))
        state["pm"], state["test_pm"] = result.outputs["pm"], result.outputs["test_pm"]
        return summary(result.metrics, ["train/loss_last", "heldout/accuracy", "heldout/log_loss", "heldout/ece",
                                        "test_pm/train/loss_last", "test_pm/heldout/accuracy",
                                        "perf/comparisons_per_s"])

    for name, fn in (("sft", sft), ("sample", sample), ("train_pm", train_pm)):
        run_step(check, recorder, name, fn, device=device, dtype=dtype, master_weights=name != "sample")
    if "pm" not in state:  # PPO, evaluate and best-of-N still run, against a PM with a random head
        state["pm"] = state["test_pm"] = random_pm(policy, work / "random-pm")
        check.say("train_pm failed: the steps below use a PM with a random head")

    ppo_keys = ["ppo/reward", "ppo/reward_test_pm", "ppo/kl", "ppo/entropy", "losses/policy", "losses/value",
                "ppo/approx_kl", "ppo/clipfrac", "charts/episodes_per_s", "eval/reward", "eval/kl"]

    def ppo(name: str, **changes):
        def fn():
            from workers.ppo import PPOConfig, run

            rollouts = size["ppo_rollouts"]
            cfg = dict(policy_path=policy, reference_path=policy, pm_path=state["pm"], test_pm_path=state["test_pm"],
                       prompts_path=inputs["prompts"], eval_prompts_path=inputs["eval_prompts"],
                       eval_every=max(1, rollouts - 1), output_dir=str(work / name),
                       total_episodes=rollouts * size["rollout"], rollout_batch_size=size["rollout"],
                       mini_batch_size=size["mini"], ppo_epochs=2, response_length=size["new_tokens"],
                       max_prompt_tokens=size["max_prompt_tokens"], kl_coef=0.05, checkpoint_every=100, seed=0,
                       **common)
            cfg.update(changes)
            result = run(PPOConfig(**cfg))
            state[name] = result.outputs["policy"]
            out = summary(result.metrics, ppo_keys)
            out.update({k: _round(v) for k, v in changed_fraction(result.outputs["policy"], policy).items()})
            return out
        return fn

    run_step(check, recorder, "ppo", ppo("ppo"), device=device, dtype=dtype, frozen_in_dtype=True)
    run_step(check, recorder, "ppo_lora", ppo("ppo_lora", lora_r=8, learning_rate=1e-4), device=device, dtype=dtype,
             frozen_in_dtype=True)
    if on_cuda and dtype != torch.float32:
        # The same run computed in float32: bfloat16 compute should move as many weights.
        run_step(check, recorder, "ppo_float32", ppo("ppo_float32", dtype="float32"), device=device,
                 dtype=torch.float32)

    def evaluate():
        from workers.evaluate import EvaluateConfig, run

        candidate = state.get("ppo", policy)
        result = run(EvaluateConfig(candidate_path=candidate, baseline_path=policy, reference_path=policy,
                                    pm_path=state["pm"], test_pm_path=state["test_pm"],
                                    prompts_path=inputs["eval_prompts"],
                                    output_dir=str(work / "evaluate"), num_samples=2, max_new_tokens=size["new_tokens"],
                                    max_prompt_tokens=size["max_prompt_tokens"], gold=GOLD, batch_size=32, **common))
        return summary(result.metrics, ["eval/win_rate_test_pm", "eval/win_rate_train_pm", "eval/kl",
                                        "eval/kl_baseline", "eval/test_pm_candidate", "eval/train_pm_delta",
                                        "eval/gold_candidate"])

    def best_of_n():
        from workers.best_of_n import BestOfNConfig, run

        result = run(BestOfNConfig(policy_path=policy, pm_path=state["pm"], prompts_path=inputs["eval_prompts"],
                                   output_dir=str(work / "best_of_n"), n=4, max_new_tokens=size["new_tokens"],
                                   max_prompt_tokens=size["max_prompt_tokens"], gold=GOLD, batch_size=32, **common))
        out = summary(result.metrics, ["bon/score_best", "bon/score_mean", "bon/gold_best", "bon/gold_mean"])
        if out["ok"] and not result.metrics["bon/score_best"] >= result.metrics["bon/score_mean"]:
            out.update(ok=False, error="the best of N scores below the mean")
        return out

    run_step(check, recorder, "evaluate", evaluate, device=device, dtype=dtype)
    run_step(check, recorder, "best_of_n", best_of_n, device=device, dtype=dtype)


def resume(check, recorder, args, size, inputs, policy, common, state, device, dtype) -> None:
    """Section 3: runs stopped part-way and resumed, against uninterrupted ones."""
    work = Path(args.work)

    def judge(gap: dict[str, Any], noise: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        # Two uninterrupted runs differ on a GPU too; the resumed run may differ as much, not more.
        allowed = max(args.resume_tolerance, 3 * noise["rel_diff"])
        ok = gap["max_abs_diff"] == 0 or gap["rel_diff"] <= allowed
        return {"ok": ok, **{k: _round(v) for k, v in gap.items()}, "allowed_rel_diff": _round(allowed),
                "rerun_max_abs_diff": _round(noise["max_abs_diff"]), "rerun_rel_diff": _round(noise["rel_diff"]),
                **extra}

    def train_pm():
        from workers.train_pm import TrainPMConfig, run

        def cfg(out: str, **kw):
            # dropout on and gradient accumulation: the resumed run needs the CUDA RNG state and the data position
            return TrainPMConfig(model_path=policy, dataset_path=inputs["comparisons"], output_dir=str(work / out),
                                 heldout_fraction=0.1, batch_size=size["batch"], micro_batch_size=size["batch"] // 2,
                                 eval_batch_size=64, learning_rate=1e-4, warmup_steps=2, lr_schedule="cosine",
                                 max_steps=size["resume_pm_steps"], max_length=size["max_length"],
                                 disable_dropout=False, checkpoint_every=0, **common, **kw)

        whole = run(cfg("resume-pm-whole"))
        again = run(cfg("resume-pm-again"))
        first = run(cfg("resume-pm-killed", max_steps_this_run=size["resume_pm_stop"]))
        if first.complete:
            return {"ok": False, "error": "the stopped run did not stop"}
        resumed = run(cfg("resume-pm-killed"))
        gap = weight_gap(whole.outputs["pm"], resumed.outputs["pm"], policy)
        noise = weight_gap(whole.outputs["pm"], again.outputs["pm"], policy)
        return judge(gap, noise, {"stopped_at": size["resume_pm_stop"], "steps": size["resume_pm_steps"],
                                  "log_loss_whole": _round(whole.metrics["heldout/log_loss"]),
                                  "log_loss_resumed": _round(resumed.metrics["heldout/log_loss"]),
                                  "resumed_complete": resumed.complete})

    def ppo():
        from workers.common.metrics import read_metrics
        from workers.ppo import PPOConfig, run

        def cfg(out: str, **kw):
            return PPOConfig(policy_path=policy, reference_path=policy, pm_path=state["pm"],
                             prompts_path=inputs["prompts"], output_dir=str(work / out),
                             total_episodes=3 * size["rollout"], rollout_batch_size=size["rollout"],
                             mini_batch_size=size["mini"], ppo_epochs=2, response_length=size["new_tokens"],
                             max_prompt_tokens=size["max_prompt_tokens"], kl_coef=0.05, learning_rate=1e-4,
                             seed=0, **common, **kw)

        whole = run(cfg("resume-ppo-whole"))
        again = run(cfg("resume-ppo-again"))
        first = run(cfg("resume-ppo-killed", max_rollouts_this_run=1))
        if first.complete:
            return {"ok": False, "error": "the stopped run did not stop"}
        resumed = run(cfg("resume-ppo-killed"))
        gap = weight_gap(whole.outputs["policy"], resumed.outputs["policy"], policy)
        noise = weight_gap(whole.outputs["policy"], again.outputs["policy"], policy)
        a = read_metrics(work / "resume-ppo-whole" / "metrics.jsonl")
        b = read_metrics(work / "resume-ppo-killed" / "metrics.jsonl")
        keys = ("ppo/reward", "ppo/kl", "losses/policy", "losses/value")
        metric_gap = max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in keys) if len(a) == len(b) == 3 else math.inf
        out = judge(gap, noise, {"stopped_at": 1, "rollouts": 3, "rollouts_logged": [len(a), len(b)],
                                 "max_metric_diff": _round(metric_gap), "resumed_complete": resumed.complete})
        out["ok"] = out["ok"] and len(a) == len(b) == 3
        return out

    run_step(check, recorder, "train_pm", train_pm, device=device, dtype=dtype, master_weights=True, section="resume")
    run_step(check, recorder, "ppo", ppo, device=device, dtype=dtype, frozen_in_dtype=True, section="resume")


def throughput(check, recorder, args, size, inputs, common, state, device, dtype, sampling) -> None:
    """Section 4: sampling tokens/s (ours vs per-prompt generate) and PPO episodes/s on the bigger policy."""
    import torch

    work = Path(args.work)
    model_dir = inputs["models"]["throughput"]["path"]
    prompts = inputs["tp_prompts"]
    k, new_tokens = 4, size["tp_new_tokens"]

    def sampling_fn():
        from workers.common.modeling import load_causal_lm, load_tokenizer
        from workers.sample import SampleConfig, run

        prompts_path = write_jsonl(work / "tp-prompts.jsonl", [{"id": i, "prompt": p} for i, p in enumerate(prompts)])
        tok = load_tokenizer(model_dir)
        model = load_causal_lm(model_dir, device=device, dtype=dtype)
        encoded = sampling.encode_for_peer(tok, prompts, size["max_prompt_tokens"])

        def peer() -> float:
            return sampling.peer_tokens_per_s(model, tok, encoded, samples=k, max_new_tokens=new_tokens,
                                              temperature=1.0, top_p=0.9)

        def ours(tag: str, batch_size: int) -> float:
            out = work / f"tp-sample-{tag}"
            shutil.rmtree(out, ignore_errors=True)
            cfg = SampleConfig(policies={"tp": model_dir}, prompts_path=prompts_path, output_dir=str(out),
                               num_samples=k, max_new_tokens=new_tokens, temperature=1.0, top_p=0.9,
                               max_prompt_tokens=size["max_prompt_tokens"], batch_size=batch_size, seed=0, **common)
            return run(cfg).metrics["perf/tokens_per_s"]

        # Warm-up: kernels, cuBLAS handles and allocator pools, for both sides.
        sampling.peer_tokens_per_s(model, tok, encoded[:1], samples=k, max_new_tokens=8, temperature=1.0, top_p=0.9)
        ours("warmup", k * len(prompts))
        rows = k * len(prompts)
        results: dict[str, list[float]] = {"ours": [], "ours_batch32": [], "peer": []}
        for rep in range(size["tp_repeats"]):
            for name in (("ours", "peer") if rep % 2 == 0 else ("peer", "ours")):
                torch.manual_seed(rep)
                value = ours(f"rep{rep}", rows) if name == "ours" else peer()
                results[name].append(value)
                check.say(f"  sampling rep {rep} {name:4s}: {value:9.1f} tokens/s")
            results["ours_batch32"].append(ours(f"rep{rep}-b32", min(32, rows)))
        med = {name: statistics.median(v) for name, v in results.items()}
        return {"ok": all(v > 0 for v in med.values()), "ours_tokens_per_s": round(med["ours"], 1),
                "ours_batch32_tokens_per_s": round(med["ours_batch32"], 1), "peer_tokens_per_s": round(med["peer"], 1),
                "ratio": round(med["ours"] / med["peer"], 3), "prompts": len(prompts), "samples_per_prompt": k,
                "max_new_tokens": new_tokens, "batch_size": rows, "repeats": size["tp_repeats"],
                "all": {n: [round(x, 1) for x in v] for n, v in results.items()}}

    def ppo_fn():
        from workers.common.metrics import read_metrics
        from workers.ppo import PPOConfig, run

        out = work / "tp-ppo"
        rollouts, batch = size["tp_ppo_rollouts"], size["tp_rollout"]
        result = run(PPOConfig(policy_path=model_dir, reference_path=model_dir, pm_path=state["pm"],
                               prompts_path=inputs["prompts"], output_dir=str(out), total_episodes=rollouts * batch,
                               rollout_batch_size=batch, mini_batch_size=size["tp_mini"], ppo_epochs=4,
                               response_length=new_tokens, max_prompt_tokens=size["max_prompt_tokens"], kl_coef=0.05,
                               checkpoint_every=100, seed=0, **common))
        rates = [r["charts/episodes_per_s"] for r in read_metrics(out / "metrics.jsonl")]
        steady = rates[1:] or rates
        return {**summary(result.metrics, ["ppo/reward", "ppo/kl", "losses/policy", "losses/value"]),
                "episodes_per_s": round(statistics.median(steady), 2),
                "episodes_per_s_all": [round(r, 2) for r in rates],
                "rollout_batch_size": batch, "mini_batch_size": size["tp_mini"], "ppo_epochs": 4,
                "response_length": new_tokens}

    run_step(check, recorder, "sampling", sampling_fn, device=device, dtype=dtype, section="throughput")
    run_step(check, recorder, "ppo", ppo_fn, device=device, dtype=dtype, frozen_in_dtype=True, section="throughput")


# -- scale ---------------------------------------------------------------------------------


def scale_shape(spec: str) -> dict[str, int]:
    """``LAYERSxHIDDEN[xHEADS[xKV_HEADS[xINTERMEDIATE]]]`` as LlamaConfig sizes.

    Left out: heads of 128 dimensions (at least 2), 4 key/value heads where 4 divides the heads (else
    as many as heads), and an intermediate size of 8/3 hidden rounded up to a multiple of 256 (Llama's rule).
    """
    try:
        parts = [int(x) for x in spec.lower().split("x")]
    except ValueError:
        parts = []
    if not 2 <= len(parts) <= 5 or min(parts) < 1:
        raise ValueError(f"--scale-size ({spec!r}) must be LAYERSxHIDDEN[xHEADS[xKV_HEADS[xINTERMEDIATE]]], "
                         "positive integers")
    layers, hidden = parts[:2]
    heads = parts[2] if len(parts) > 2 else max(2, hidden // 128)
    kv_heads = parts[3] if len(parts) > 3 else (4 if heads % 4 == 0 else heads)
    intermediate = parts[4] if len(parts) > 4 else 256 * math.ceil(8 * hidden / 3 / 256)
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"--scale-size ({spec!r}): hidden ({hidden}) must be divisible by heads ({heads}) "
                         f"and heads by key/value heads ({kv_heads})")
    return {"layers": layers, "hidden": hidden, "heads": heads, "kv_heads": kv_heads, "intermediate": intermediate}


def peak_flops(device, device_name: str, override_tflops: float | None) -> tuple[float | None, str]:
    """The device's peak dense bfloat16 FLOP/s and where the number comes from (None when unknown)."""
    if override_tflops is not None:
        return override_tflops * 1e12, "--peak-tflops"
    if device.type != "cuda":
        return None, f"no peak known for {device.type}; pass --peak-tflops"
    for key, value in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return value, f"PEAK_BF16_FLOPS[{key!r}]"
    return None, f"{device_name!r} is not in PEAK_BF16_FLOPS; pass --peak-tflops"


def build_scale_model(out: Path, shape: dict[str, int], tokenizer_dir: str, device) -> dict[str, Any]:
    """A randomly initialised ``LlamaForCausalLM`` of ``shape`` (untied LM head, the script's tokenizer), saved
    in bfloat16 as Hugging Face checkpoints of this size are. Initialised on ``device`` (seconds on a GPU
    for what takes minutes on a CPU). Returns its parameter counts: all, and N of the FLOP formulas."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from workers.common.modeling import load_tokenizer
    from workers.common.testing import count_parameters

    tokenizer = load_tokenizer(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], max_position_embeddings=2048, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), torch.device(device):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.to(torch.bfloat16)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    total = count_parameters(model)
    embedding = model.get_input_embeddings().weight.numel()
    lm_head = model.get_output_embeddings().weight.numel()
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # N of 2N / 6N per token: every weight a token's matmuls use. The input embedding is a lookup; a PM
    # is the trunk without the LM head (its scalar head's hidden_size weights are left out too).
    return {"path": str(out), "parameters": total, "vocab": len(tokenizer),
            "n_policy": total - embedding, "n_pm": total - embedding - lm_head}


def _mfu(flops_per_s: float, peak: float | None) -> float | None:
    return _round(flops_per_s / peak) if peak else None


def scale(check, recorder, args, size, inputs, device) -> None:
    """Section 5: train_pm and ppo on a Llama-shaped model in bfloat16: tokens/s, MFU, peak memory."""
    from workers.common.runtime import resolve_dtype

    work = Path(args.work) / "scale"
    work.mkdir(parents=True, exist_ok=True)
    dtype_name = "bfloat16" if args.dtype == "auto" else args.dtype
    dtype = resolve_dtype(dtype_name, device)
    shape = scale_shape(size["scale_model"])
    peak, peak_source = peak_flops(device, check.report["env"]["device_name"], args.peak_tflops)
    common = {"device": args.device, "dtype": dtype_name, "progress": False}
    model: dict[str, Any] = {}
    state: dict[str, str] = {}
    check.report["scale_model"] = {**shape, "dtype": dtype_name, "peak_flops": peak, "peak_source": peak_source}

    def setup():
        model.update(build_scale_model(work / "policy", shape, inputs["models"]["step"]["path"], device))
        check.report["scale_model"].update({k: v for k, v in model.items() if k != "path"})
        check.say(f"scale model: {shape['layers']} x {shape['hidden']}, {shape['heads']} heads "
                  f"({shape['kv_heads']} key/value), intermediate {shape['intermediate']}, vocab {model['vocab']}: "
                  f"{model['parameters'] / 1e6:.1f}M parameters; peak {peak} ({peak_source})")
        return {"ok": True, "parameters": model["parameters"]}

    def train_pm():
        from workers.train_pm import TrainPMConfig, run

        def cfg(out: str, steps: int) -> TrainPMConfig:
            # select_by="last": no validation passes, and no best-weights file written (gigabytes at this size)
            return TrainPMConfig(model_path=model["path"], dataset_path=inputs["comparisons"],
                                 output_dir=str(work / out), heldout_fraction=0.1, select_by="last",
                                 batch_size=size["scale_pm_batch"], eval_batch_size=size["scale_pm_batch"],
                                 learning_rate=1e-5, max_steps=steps, max_length=size["scale_max_length"],
                                 checkpoint_every=0, **common)

        # A warm-up run (kernels, cuBLAS handles, the allocator's pools), then the timed one.
        run(cfg("pm-warmup", size["scale_pm_warmup"]))
        shutil.rmtree(work / "pm-warmup", ignore_errors=True)
        result = run(cfg("pm", size["scale_pm_steps"]))
        state["pm"] = result.outputs["pm"]
        m = result.metrics
        out = summary(m, ["train/loss_last", "heldout/accuracy", "perf/tokens_per_s", "perf/comparisons_per_s"])
        if not out["ok"]:
            return out
        flops_per_s = 6 * model["n_pm"] * m["perf/tokens_per_s"]
        out.update(tokens_per_s=round(m["perf/tokens_per_s"], 1),
                   comparisons_per_s=round(m["perf/comparisons_per_s"], 2),
                   model_flops_per_s=_round(flops_per_s), mfu=_mfu(flops_per_s, peak),
                   pad_fraction=_round(m["perf/pad_fraction"]), train_seconds=_round(m["perf/train_seconds"]),
                   timed_steps=size["scale_pm_steps"], warmup_steps=size["scale_pm_warmup"],
                   batch_size=size["scale_pm_batch"], max_length=size["scale_max_length"],
                   flops_per_token=6 * model["n_pm"])
        check.say(f"  scale train_pm: {out['tokens_per_s']:.0f} tokens/s, MFU {out['mfu']}")
        return out

    def ppo():
        from workers.common.data import load_prompts
        from workers.common.metrics import read_metrics
        from workers.common.modeling import load_tokenizer
        from workers.common.policy_step import prompt_order
        from workers.common.rollout import encode_prompts
        from workers.ppo import PPOConfig, run

        timed, batch, epochs = size["scale_rollouts"], size["scale_rollout"], 4
        # Rollout 1 is the warm-up; the run stops before its last rollout (total), and checkpoint_every=total
        # is never reached, so no checkpoint or policy is written.
        total = timed + 2
        cfg = PPOConfig(policy_path=model["path"], reference_path=model["path"], pm_path=state["pm"],
                        prompts_path=inputs["prompts"], output_dir=str(work / "ppo"), total_episodes=total * batch,
                        rollout_batch_size=batch, mini_batch_size=size["scale_mini"], ppo_epochs=epochs,
                        response_length=size["scale_new_tokens"], max_prompt_tokens=size["max_prompt_tokens"],
                        kl_coef=0.05, learning_rate=1e-6, checkpoint_every=total, max_rollouts_this_run=timed + 1,
                        seed=0, **common)
        result = run(cfg)
        rows = read_metrics(work / "ppo" / "metrics.jsonl")
        out = summary(result.metrics, ["ppo/reward", "ppo/kl", "losses/policy", "losses/value"])
        if len(rows) != timed + 1 or result.complete:
            return {**out, "ok": False, "error": f"{len(rows)} rollouts logged (complete={result.complete}), "
                                                 f"expected {timed + 1} of {total}"}
        prompt_ids = encode_prompts(load_tokenizer(model["path"]), load_prompts(inputs["prompts"]),
                                    max_prompt_tokens=cfg.max_prompt_tokens)
        # Per real token: generation, the policy's scoring pass and the reference at 2 N_policy, the PM at
        # 2 N_pm, and ppo_epochs training passes at 6 N_policy.
        n_policy, n_pm = model["n_policy"], model["n_pm"]
        shares = {"generation": 2 * n_policy, "scoring": 2 * n_policy + 2 * n_policy + 2 * n_pm,
                  "training": 6 * n_policy * epochs}
        flops_per_token = sum(shares.values())
        tokens = responses = seconds = 0.0
        per_rollout = []
        for row in rows[1:]:
            k = row["step"] - 1  # the rollout's index; its prompts are prompt_order's slots for it
            order = prompt_order(len(prompt_ids), cfg.seed, k * batch, batch)
            prompt_tokens = sum(len(prompt_ids[i]) for i in order)
            response_tokens = round(row["ppo/response_length"] * batch)
            rollout_s = batch / row["charts/episodes_per_s"]
            tokens += prompt_tokens + response_tokens
            responses += response_tokens
            seconds += rollout_s
            per_rollout.append(round((prompt_tokens + response_tokens) / rollout_s, 1))
        flops_per_s = flops_per_token * tokens / seconds
        out.update(tokens_per_s=round(tokens / seconds, 1), response_tokens_per_s=round(responses / seconds, 1),
                   episodes_per_s=round(timed * batch / seconds, 2), model_flops_per_s=_round(flops_per_s),
                   mfu=_mfu(flops_per_s, peak), tokens_per_s_per_rollout=per_rollout,
                   flops_share={k: round(v / flops_per_token, 3) for k, v in shares.items()},
                   flops_per_token=flops_per_token, timed_rollouts=timed, warmup_rollouts=1,
                   rollout_batch_size=batch, mini_batch_size=size["scale_mini"], ppo_epochs=epochs,
                   response_length=size["scale_new_tokens"], timed_seconds=_round(seconds))
        check.say(f"  scale ppo: {out['tokens_per_s']:.0f} tokens/s ({out['episodes_per_s']} episodes/s), "
                  f"MFU {out['mfu']}")
        return out

    if run_step(check, recorder, "setup", setup, device=device, dtype=dtype, section="scale") is None \
            or not check.report["scale"]["setup"]["ok"]:
        return
    run_step(check, recorder, "train_pm", train_pm, device=device, dtype=dtype, master_weights=True, section="scale")
    if "pm" not in state:  # PPO still runs, against a PM with a random head
        state["pm"] = random_pm(model["path"], work / "random-pm")
        check.say("scale train_pm failed: scale ppo uses a PM with a random head")
    run_step(check, recorder, "ppo", ppo, device=device, dtype=dtype, frozen_in_dtype=True, section="scale")


if __name__ == "__main__":
    sys.exit(main())
