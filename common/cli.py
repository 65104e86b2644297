"""`fedvlsm` command line: a thin layer over the Python API in `common`.

    fedvlsm params  --base B --adapter A [--json]
    fedvlsm train   DATA --base B --adapter A --out DIR [...]
    fedvlsm eval    DATA --adapter-dir DIR [--split test] [--json]
    fedvlsm predict --adapter-dir DIR --image IMG --prompt "..." --out OUT
    fedvlsm data synth OUT --sites K --per-site N --seed S
    fedvlsm data check PATH
    fedvlsm simulate [--run-config CFG ...] [--num-sites N]
    fedvlsm dashboard [--runs DIR] [--host 127.0.0.1] [--port 8050] [--token T]
    fedvlsm site start --superlink HOST:PORT --data DIR [--root-certificates CA --auth-key KEY | --insecure]
    fedvlsm deploy certs OUT --server-name HOST --site NAME [--site NAME ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from common.adapters.spec import INITS, VARIANTS  # plain Python: no torch at parser-build time
from common.config import COMPILE_MODES, device_problem  # torch-free at import, like the two above
from common.data.cli import HELP_FORMAT, path_arg  # every option's default shown (tests/test_cli.py checks help lines)


def device_arg(value: str) -> str:
    """argparse type of every --device: the same check as TrainConfig.device, said by argparse (exit 2)."""
    problem = device_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def port_arg(value: str) -> int:
    """argparse type of a TCP port option: 0 (pick a free one) to 65535."""
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port in 0..65535 (0: a free one), got {port}")
    return port


# The option of each TrainConfig field the CLI sets, so that a refused value names what was typed.
TRAIN_OPTIONS = {"epochs": "--epochs", "batch_size": "--batch-size", "lr": "--lr", "early_stop_patience": "--patience",
                 "seed": "--seed", "device": "--device", "eval_prompt_index": "--eval-prompt-index"}


def _train_config(**values):
    from common.config import TrainConfig, TrainConfigError

    try:
        return TrainConfig(**values)
    except TrainConfigError as err:
        raise ValueError(f"{TRAIN_OPTIONS.get(err.field, err.field)}: {err.why}") from None


def _spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default="demo",
                   help="hub id, local folder, arch:clipseg-rd64-refined, arch:tiny or demo")
    p.add_argument("--adapter", default="dense-vl", choices=VARIANTS, help="adapter variant or baseline")
    p.add_argument("--init", default="paper", choices=INITS,
                   help="adapter initialisation: paper block, or identity (starts exactly at the base)")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (adapter lora only)")


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=20, help="maximum number of training epochs")
    p.add_argument("--batch-size", type=int, default=8, help="images per training step")
    p.add_argument("--lr", type=float, default=None, help="learning rate; None = 3e-4 shallow, 1e-3 dense")
    p.add_argument("--patience", type=int, default=20, help="early stop after this many epochs without a better val Dice")
    p.add_argument("--seed", type=int, default=0, help="random seed (weights init, shuffling, prompt draws)")
    p.add_argument("--device", default="auto", type=device_arg, help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="autocast on CUDA GPUs (auto: bf16 where supported, else fp16; never on CPU/mps)")
    p.add_argument("--eval-prompt-index", type=int, default=9,
                   help="fixed prompt p_k used for evaluation (nearest lower non-empty one if absent)")
    p.add_argument("--compile", default="off", choices=COMPILE_MODES,
                   help="GPU fast path: cuda-graph runs each training step as one CUDA graph (CUDA, bf16); "
                        "the others are torch.compile modes; off (default) runs it eagerly")
    p.add_argument("--cache-dir", default=None, type=path_arg, help="keep preprocessed images here for later runs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_model_commands(sub: argparse._SubParsersAction) -> None:
    """params / train / eval / predict: one site's adapters, on the Python API in common.api."""
    p = sub.add_parser("params", help="trainable/total parameter counts and adapter payload size",
                       description="Trainable/total parameter counts and adapter payload size.",
                       formatter_class=HELP_FORMAT)
    _spec_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("train", help="train adapters at one site",
                       description="Train adapters on one site's train split, early-stopped on its val split.",
                       formatter_class=HELP_FORMAT)
    p.add_argument("data", type=path_arg, help="dataset folder (folder format or medvlsm anns/)")
    _spec_args(p)
    _train_args(p)
    p.add_argument("--out", required=True, type=path_arg, help="output folder for the best adapter and the training log")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate an adapter folder on a dataset split",
                       description="Dice, IoU and HD95 of an adapter folder on one split, at original resolution.",
                       formatter_class=HELP_FORMAT)
    p.add_argument("data", type=path_arg, help="dataset folder (folder format or medvlsm anns/)")
    p.add_argument("--adapter-dir", required=True, type=path_arg, help="folder with adapter_model.safetensors and adapter_config.json")
    p.add_argument("--base", default=None, help="override the base recorded in the adapter config")
    p.add_argument("--split", default="test", help="dataset split to evaluate")
    p.add_argument("--eval-prompt-index", type=int, default=9,
                   help="fixed prompt p_k used for evaluation (nearest lower non-empty one if absent)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument("--device", default="auto", type=device_arg, help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--out", default=None, type=path_arg, help="also write the metrics (with per-item rows) to this JSON file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="segment one image with a text prompt",
                       description="Segment one image with a text prompt; writes mask.png and overlay.png.",
                       formatter_class=HELP_FORMAT)
    p.add_argument("--adapter-dir", required=True, type=path_arg, help="folder with adapter_model.safetensors and adapter_config.json")
    p.add_argument("--base", default=None, help="override the base recorded in the adapter config")
    p.add_argument("--image", required=True, type=path_arg, help="image file (PNG, JPEG, BMP, TIFF, 2D NIfTI or DICOM)")
    p.add_argument("--prompt", required=True, help="text prompt, e.g. \"round lesion\"")
    p.add_argument("--out", required=True, type=path_arg, help="output folder: mask.png and overlay.png")
    p.add_argument("--device", default="auto", type=device_arg, help="auto | cpu | cuda | cuda:N | mps")
    p.set_defaults(func=cmd_predict)


def build_parser() -> argparse.ArgumentParser:
    """The whole `fedvlsm` parser. Builds without importing torch/transformers/MONAI.

    Each command group is registered by one small function taking the
    subparsers object (`add_model_commands` here, `add_data_commands` in
    common/data/cli.py). Adding a group (e.g. `simulate`, `dashboard`) is a
    2-line change: import its `add_..._commands(sub)` below and call it. Its
    module must keep heavy imports (torch, flwr, ...) inside the command
    functions (`func`), never at module level, so that `fedvlsm --help`
    stays fast (tests/test_cli.py checks that no heavy module is imported).
    """
    from common.data.cli import add_data_commands

    parser = argparse.ArgumentParser(prog="fedvlsm", description=__doc__, formatter_class=HELP_FORMAT,
                                     epilog="`fedvlsm COMMAND --help` lists a command's options and their defaults.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_model_commands(sub)
    add_data_commands(sub)
    from simulations.simulate import add_simulate_command  # light: imports only argparse at module level

    add_simulate_command(sub)
    add_dashboard_command(sub)
    from client.launcher import add_site_commands  # light: argparse only at module level
    from server.certs import add_deploy_commands  # light: argparse only at module level

    add_site_commands(sub)
    add_deploy_commands(sub)
    return parser


def add_dashboard_command(sub) -> None:
    """`fedvlsm dashboard`: serve the runs' dashboard (server/dashboard); imports happen when it runs."""
    p = sub.add_parser("dashboard", help="watch federated runs live in a browser (read-only, offline)")
    p.add_argument("--runs", default=None, help="runs folder (default: $FEDVLSM_HOME/runs, else ~/.fedvlsm/runs)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need a token)")
    p.add_argument("--port", type=port_arg, default=8050, help="port (default 8050; 0: a free one)")
    p.add_argument("--token", default=None,
                   help="access token required on every route (default: $FEDVLSM_DASHBOARD_TOKEN, else none)")

    def cmd_dashboard(args: argparse.Namespace) -> int:
        from common.federation_config import fedvlsm_home
        from server.dashboard import DashboardError, serve

        runs = Path(args.runs).expanduser() if args.runs else fedvlsm_home() / "runs"
        if runs.exists() and not runs.is_dir():
            print(f"fedvlsm dashboard: error: --runs {runs}: is not a folder", file=sys.stderr)
            return 2
        try:
            serve(runs, host=args.host, port=args.port, token=args.token)
        except DashboardError as err:
            print(f"fedvlsm dashboard: error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 0  # Ctrl-C is how the dashboard is stopped
        return 0

    p.set_defaults(func=cmd_dashboard)


def _spec(args: argparse.Namespace):
    from common.adapters import AdapterSpec

    return AdapterSpec(variant=args.adapter, init=args.init, lora_rank=args.lora_rank)


def cmd_params(args: argparse.Namespace) -> int:
    from common.bases import load_base
    from common.model import build_model
    from common.payload import expected_update_bytes

    base = load_base(args.base)
    model = build_model(base, _spec(args))
    counts = model.parameter_counts()
    tensors = len(model.adapter_names())
    base_params = sum(p.numel() for p in base.model.parameters())
    info = {
        "base": base.base_id,
        "adapter": args.adapter,
        **counts,
        "trainable_percent": 100.0 * counts["trainable"] / counts["total"],
        # What one site uploads per round (its update), by payload-dtype.
        "payload_bytes_fp32": expected_update_bytes(counts["trainable"], tensors, "fp32"),
        "payload_bytes_fp16": expected_update_bytes(counts["trainable"], tensors, "fp16"),
        "payload_bytes_int8": expected_update_bytes(counts["trainable"], tensors, "int8"),
        # ...and what full-model FedAvg would upload: every base weight in fp32.
        "full_model_fedavg_bytes_fp32": 4 * base_params,
        "tensors": tensors,
    }
    # None for variant "none" (nothing to send): there is no ratio to a zero-byte update.
    info["int8_reduction_vs_full_model_fp32"] = (info["full_model_fedavg_bytes_fp32"] / info["payload_bytes_int8"]
                                                 if info["payload_bytes_int8"] else None)
    if args.json:
        print(json.dumps(info))
    else:
        print(f"base {info['base']}, adapter {info['adapter']}")
        print(f"trainable params: {counts['trainable']:,} || all params: {counts['total']:,} "
              f"|| trainable%: {info['trainable_percent']:.4f}")
        print(f"payload per site and round: {info['payload_bytes_fp32']:,} bytes fp32, "
              f"{info['payload_bytes_fp16']:,} fp16, {info['payload_bytes_int8']:,} int8 ({info['tensors']} tensors); "
              f"full-model FedAvg in fp32: {info['full_model_fedavg_bytes_fp32']:,}"
              + (f" ({info['int8_reduction_vs_full_model_fp32']:.0f}x the int8 update)"
                 if info["int8_reduction_vs_full_model_fp32"] else " (this variant sends nothing)"))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from common.api import train_site

    cfg = _train_config(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                        device=args.device, amp=args.amp, eval_prompt_index=args.eval_prompt_index,
                        early_stop_patience=args.patience, progress=not args.quiet, compile=args.compile)
    if args.cache_dir and Path(args.cache_dir).exists() and not Path(args.cache_dir).is_dir():
        raise ValueError(f"--cache-dir {args.cache_dir}: exists and is not a folder")
    result = train_site(args.data, base=args.base, spec=_spec(args), cfg=cfg, out_dir=args.out,
                        cache_dir=args.cache_dir)
    print(f"best val Dice {result.best_val_dice:.4f} at epoch {result.best_epoch} "
          f"({result.epochs_run} epochs, {result.seconds:.1f} s); adapter saved in {Path(args.out).resolve()}")
    for reason in result.path.get("capture_failures", []):  # trained eagerly instead: said, not hidden
        print(f"note: a CUDA graph capture failed, those steps ran eagerly: {reason}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from common.api import evaluate_adapter_dir
    from common.atomic import json_safe

    if args.out and Path(args.out).is_dir():  # before the evaluation, not after it
        raise ValueError(f"--out {args.out}: is a folder; give a file name for the JSON report")
    cfg = _train_config(batch_size=args.batch_size, device=args.device, eval_prompt_index=args.eval_prompt_index)
    result = evaluate_adapter_dir(args.data, args.adapter_dir, split=args.split, cfg=cfg, base=args.base)
    summary = {"data": str(args.data), "split": args.split, "adapter_dir": str(args.adapter_dir),
               **result.summary()}
    if args.out:
        from common.atomic import write_json_atomic

        write_json_atomic(Path(args.out), json_safe({**summary, "items": result.per_item}))
    if args.json:
        print(json.dumps(json_safe(summary)))  # an undefined HD95 is null, never the invalid token NaN
    else:
        print(f"{'split':<8}{'n':>5}{'Dice':>9}{'IoU':>9}{'HD95':>9}{'loss':>9}")
        print(f"{args.split:<8}{result.n:>5}{result.dice:>9.4f}{result.iou:>9.4f}{result.hd95:>9.2f}{result.loss:>9.4f}")
        if result.hd95_undefined:
            print(f"(HD95 undefined for {result.hd95_undefined} item(s) with an empty mask or prediction)")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from common.api import predict_to_files

    mask_path, overlay_path = predict_to_files(args.adapter_dir, args.image, args.prompt, args.out,
                                               base=args.base, device=args.device)
    print(f"mask: {mask_path}\noverlay: {overlay_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Known failures (bad data, a damaged or mismatched adapter, a base that
    # cannot load) are one "error:" line and exit 2, never a traceback:
    # DataError, AdapterStateError and AdapterFileError are ValueErrors; an
    # output path that cannot be written (a folder, no permission) is an OSError.
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as err:
        return _fail(args, err)
    except RuntimeError as err:
        from common.bases import BaseLoadError

        if isinstance(err, BaseLoadError):
            return _fail(args, err)
        raise


def _fail(args: argparse.Namespace, err: BaseException) -> int:
    print(f"fedvlsm {args.command}: error: {err}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
