"""A site's message handlers: unpack, call common/, reply. Registered by client_app.py.

- ``train``: global (shared) adapter in, local epochs (+ FedProx term when
  the server sends ``proximal-mu``), shared adapter tensors out; personal
  parts are saved at the site and never put in the reply.
- ``evaluate``: validation Dice of the global adapter and of the site's
  personalised one.
- ``evaluate.final``: test Dice of the frozen base, the global and the
  personalised adapter (optionally after a final local fine-tuning).
- ``train.local-only``: a site-only adapter trained with the same epoch
  budget; replies with its test Dice (metrics only, no tensors).

Every reply carries the process's base-load count/seconds and start-up
timings, so the cost of Flower's fresh-ClientApp-per-message model is
measured, not guessed.

Settings come from the run config the server sends with every message
(``Cfg.RUN_CONFIG``), never from this process's launch: a resumed run's
saved config governs every site. Nothing a handler raises leaves the site as
text: ``served`` turns any failure into a reply with a short public reason
(categories and counts, see common/site_errors.py) and writes the details
(paths, traceback) to the site's own log.
"""

from __future__ import annotations

import time

_IMPORT_START = time.perf_counter()

import dataclasses
import functools
import os
import traceback
import zlib
from collections.abc import Callable
from datetime import UTC, datetime
from logging import INFO, WARNING
from pathlib import Path

import psutil
from flwr.app import (
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.common.logger import log

from client import site as sites
from client.arrays import to_numpy, to_record
from common.adapters import AdapterSpec
from common.bases import Base
from common.evaluate import evaluate as evaluate_model
from common.federation_config import (
    NODE_DATA_PATH,
    NODE_SITE_DIR,
    NODE_SITE_NAME,
    ConfigError,
    FederationConfig,
    SiteIdentity,
    is_run_name,
)
from common.model import build_model
from common.payload import (
    Cfg,
    Rec,
    from_wire,
    payload_bytes,
    encode_update,
    split_personal,
    to_torch,
    update_of,
)
from common.site_errors import SiteRefusal, public_reason
from common.site_naming import default_site_dir, fedvlsm_home
from common.site_policy import SitePolicy, ledgers_elsewhere, mark_ledger
from common.train import fit

# Seconds this process spent importing the handlers' dependencies (torch,
# transformers, monai, flwr...): paid once per Ray actor in simulation and
# once per message in deployment, where each message gets a new process.
IMPORT_SECONDS = time.perf_counter() - _IMPORT_START

Handler = Callable[[Message, Context], Message]


def run_config_of(msg: Message) -> FederationConfig:
    """The run's settings, as the server sent them with this message."""
    conf = msg.content[Rec.CONFIG] if Rec.CONFIG in msg.content else ConfigRecord()
    if Cfg.RUN_CONFIG not in conf:
        raise SiteRefusal("protocol: the message carries no run config (server and site run different "
                          "fedvlsm versions?)")
    try:
        return FederationConfig.from_json(str(conf[Cfg.RUN_CONFIG]))
    except ConfigError as err:  # e.g. an adapter variant this site's fedvlsm does not know
        raise SiteRefusal(f"run config: this site cannot serve it ({err})") from err


def _train_config(cfg: FederationConfig, epochs: int, seed: int, prox_mu: float = 0.0):
    """The run's local-training settings on this site's hardware: the worker's `--device` and `--compile`
    ($FEDVLSM_DEVICE, $FEDVLSM_COMPILE: the site's choices, not the consortium's)."""
    tc = cfg.train_config(epochs, seed, prox_mu=prox_mu)
    device = os.environ.get("FEDVLSM_DEVICE", "")
    if device and not os.environ.get("FEDVLSM_FORCE_CPU"):
        tc = dataclasses.replace(tc, device=device)
    compile_mode = os.environ.get("FEDVLSM_COMPILE", "")
    return dataclasses.replace(tc, compile=compile_mode) if compile_mode else tc


def _setup(msg: Message, context: Context) -> tuple[FederationConfig, sites.Site, Base, int, str]:
    cfg = run_config_of(msg)
    run_name, _ = _run_name(msg), _run_id(msg)  # both name folders here: checked before any is made
    cfg.apply_threads()
    site = sites.Site(cfg, context.node_config)
    _refuse_image_cap(cfg, site)
    site.ensure_data_ok()
    try:
        frozen = sites.base(cfg.base)
    except Exception as err:  # the base spec may be a path on this machine: keep it home
        raise SiteRefusal(f"base: cannot load the run's base here ({type(err).__name__})",
                          f"loading base {cfg.base!r}: {err}") from err
    conf = msg.content[Rec.CONFIG]
    return cfg, site, frozen, int(conf.get(Cfg.ROUND, 0)), run_name


def _run_name(msg: Message) -> str:
    """The message's run name, refused unless it is one plain folder name: the site names folders by it
    (`<site-dir>/runs/<run-name>/personal`, `privacy/<run-name>.json`), and '../..' from a server would
    have put them, and renamed folders, outside the site's own folder."""
    name = str(msg.content[Rec.CONFIG].get(Cfg.RUN_NAME, "adhoc"))
    if not is_run_name(name):
        raise SiteRefusal(f"protocol: run name {name!r} is not a run-name (letters, digits, '.', '_' or '-')")
    return name


def _refuse_image_cap(cfg: FederationConfig, site: sites.Site) -> None:
    """A deployed site serves no run that caps its images (`max-images`, for simulations and quick trials).

    With the cap the server picks how many images a figure covers: `max-images = 1` made every
    site send one image's train loss, validation Dice and loss (and, differencing k and k+1,
    any image's). A simulation's sites are partitions of data the server process holds anyway.
    """
    if cfg.max_images and site.identity.data_path is not None:
        raise SiteRefusal("site policy: a deployed site uses all its images (max-images would let a figure "
                          "cover a single image)", f"the run sets max-images = {cfg.max_images}")


def _run_id(msg: Message) -> str:
    """Which run of its name a message belongs to ('' from a server that sends none); a plain name, as a
    run name is: it is written into the site's folder and names the folder a replaced run's parts move to."""
    run_id = str(msg.content[Rec.CONFIG].get(Cfg.RUN_ID, ""))
    if run_id and not is_run_name(run_id):
        raise SiteRefusal(f"protocol: run id {run_id!r} is not a plain name")
    return run_id


def site_log_path(msg: Message, context: Context) -> Path:
    """This site's own log (never sent anywhere): `<site folder>/logs/site.log`."""
    cfg = None
    try:
        cfg = run_config_of(msg)
        return SiteIdentity.from_node_config(context.node_config, cfg).site_dir / "logs" / "site.log"
    except Exception:  # noqa: BLE001 - identity itself failed; still log somewhere local
        node = context.node_config
        if node.get(NODE_SITE_DIR):  # the site's own folder, as its node config names it
            return Path(str(node[NODE_SITE_DIR])).expanduser() / "logs" / "site.log"
        if node.get(NODE_DATA_PATH):  # a deployed site never takes the run's `home`: a folder on the server
            return default_site_dir(Path(str(node[NODE_DATA_PATH])), str(node.get(NODE_SITE_NAME, "") or "")) \
                / "logs" / "site.log"
        home = cfg.home_dir if cfg is not None else fedvlsm_home()
        return home / "sites" / sites.site_name_for(node) / "logs" / "site.log"


def log_at_site(msg: Message, context: Context, text: str) -> Path | str:
    """Append `text` to the site's log; where it went (or why it could not be written, for the console)."""
    try:
        path = site_log_path(msg, context)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(f"{datetime.now(UTC).isoformat(timespec='seconds')} {text.rstrip()}\n")
        return path
    except OSError as err:  # the failure's own reason must still reach the reply, not this one
        log(WARNING, "[fedvlsm site] cannot write the site log (%s); the details follow\n%s", err, text)
        return "this console"


def served(phase: str) -> Callable[[Handler], Handler]:
    """Wrap a handler so that any failure becomes a safe reply (short reason, no paths or texts)."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def run(msg: Message, context: Context) -> Message:
            try:
                return handler(msg, context)
            except Exception as err:  # noqa: BLE001 - every failure must become a safe reply
                reason = public_reason(phase, err)
                detail = err.detail if isinstance(err, SiteRefusal) else traceback.format_exc()
                where = log_at_site(msg, context, f"[{phase}] {reason}\n{detail}")
                log(WARNING, "[fedvlsm site] %s failed: %s (details: %s)", phase, reason, where)
                return error_reply(msg, context, reason)

        return run

    return wrap


def error_reply(msg: Message, context: Context, reason: str) -> Message:
    """A reply that says the site could not serve `msg`, and why, in words safe to send."""
    name = sites.site_name_for(context.node_config)
    return Message(RecordDict({Rec.STATUS: ConfigRecord({"error": reason}), Rec.SITE: ConfigRecord({"name": name})}),
                   reply_to=msg)


def _received(msg: Message) -> tuple[dict, int]:
    """The global adapter sent with `msg` as fp32 torch tensors, and its payload bytes."""
    if Rec.ARRAYS not in msg.content:
        return {}, 0
    wire = {k: to_numpy(a) for k, a in msg.content[Rec.ARRAYS].items()}
    return to_torch(from_wire(wire)), payload_bytes(wire)


def _local_seed(cfg: FederationConfig, server_round: int, site_name: str) -> int:
    # Depends only on (run seed, round, site): a resumed run trains exactly
    # like an uninterrupted one, and sites do not share shuffles.
    return (cfg.seed * 1_000_003 + server_round * 10_007 + zlib.crc32(site_name.encode())) % 2**31


@functools.lru_cache(maxsize=1)
def _created(pid: int) -> float:
    return psutil.Process(pid).create_time()


def _process_created() -> float:
    """This process's creation time, read once per process (psutil reads /proc on every call).

    Keyed by pid, so a forked child does not inherit its parent's.
    """
    return _created(os.getpid())


def _runtime_metrics(handler_start: float) -> dict[str, float]:
    stats = sites.process_stats()
    return {
        "base-loads": float(stats["base-loads"]),
        "base-load-seconds": float(stats["base-load-seconds"]),
        "process-messages": float(stats["process-messages"]),
        "import-seconds": float(IMPORT_SECONDS),
        # From process creation to this handler: the full start-up a message
        # pays when its process is new (deployment), ~age of the actor otherwise.
        "process-age-seconds": float(handler_start - _process_created()),
        # 1: served by a long-lived site worker (client/worker.py); 0: in the ClientApp's own process.
        "served-by-worker": float(bool(os.environ.get("FEDVLSM_IN_WORKER"))),
    }


def _reply(msg: Message, site: sites.Site, metrics: dict[str, float], arrays: dict | None = None) -> Message:
    content = RecordDict(
        {
            Rec.METRICS: MetricRecord({k: float(v) for k, v in metrics.items()}),
            Rec.SITE: ConfigRecord({"name": site.name}),
        }
    )
    if arrays is not None:
        content[Rec.ARRAYS] = to_record(arrays)
    return Message(content, reply_to=msg)


def _bump_rounds_trained(context: Context) -> int:
    """Per-run history the SuperNode keeps for this site across messages."""
    record = context.state.config_records.get("site-history", ConfigRecord({"rounds-trained": 0}))
    record["rounds-trained"] = int(record["rounds-trained"]) + 1
    context.state["site-history"] = record
    return int(record["rounds-trained"])


def _check_site_ledger(site: sites.Site, policy: SitePolicy) -> None:
    """A deployed site's DP-SGD steps are accounted in one site folder per data folder.

    The site budget bounds every run on the data, but the ledger lives in the site folder: a site
    restarted with another --site-name or --site-dir began from epsilon 0 on the same images.
    Every charged folder records the data it accounts; a site with a budget refuses to train
    while another folder (under $FEDVLSM_HOME/sites or beside its own) holds runs on its data.
    """
    data = site.identity.data_path
    if data is None:  # a simulation's partitions: its site folders are the run's own
        return
    if policy.budget > 0:
        others = ledgers_elsewhere(data, site.site_dir)
        if others:
            raise SiteRefusal("site policy: this site's data has a privacy ledger in another site folder",
                              f"{', '.join(map(str, others))} already accounts DP-SGD runs on {data}; a new "
                              f"ledger in {site.site_dir} would restart dp-site-budget from epsilon 0. Start "
                              f"the site with --site-dir {others[0]} (and its --site-name)")
    mark_ledger(site.site_dir, data)


@served("train")
def train(msg: Message, context: Context) -> Message:
    start = time.time()
    cfg, site, frozen, server_round, run_name = _setup(msg, context)
    policy = site.policy
    if policy.demands_dp and cfg.dp != "sample":
        raise SiteRefusal("site policy: this site trains only with dp = 'sample'",
                          f"the run asks for dp = {cfg.dp!r}; this site's node config sets dp-require or "
                          "dp-site-budget, so it sends no update that is not sample-level DP")
    shared_in, bytes_down = _received(msg)
    run_id = _run_id(msg)
    # Which round's personal parts this round starts from: the server refuses a site that lost them.
    personal_from = site.personal_round(run_name, server_round, run_id) if cfg.personal else None
    with site.leased_model(frozen, shared_in, site.personal_parts(run_name, personal_from or 0, run_id)) as model:
        # The update's reference: the shared adapter this site starts from (the
        # global one it received, or the common initial one if none was sent).
        start_shared = split_personal(model.adapter_state(), cfg.personal)[0]  # adapter_state clones
        mu = float(msg.content[Rec.CONFIG].get(Cfg.PROX_MU, 0.0))
        seed = _local_seed(cfg, server_round, site.name)
        train_ds = site.dataset("train", frozen, train=True, seed=seed)
        train_cfg = _train_config(cfg, cfg.local_epochs, seed, prox_mu=mu)
        privacy: dict[str, float] = {}
        if cfg.dp == "sample":
            # DP-SGD (Opacus) with this site's accountant, kept in its site folder
            # across processes, rounds and resumes; a round that would exceed the
            # budget is refused before any image is read.
            from common.privacy import BudgetExhausted, DPSettings, PrivacyError, fit_private, site_state_path

            try:
                state_path = site_state_path(site.site_dir, run_name)
            except PrivacyError as err:  # the server's run name: safe to say back
                raise SiteRefusal(f"privacy: {err}") from err
            _check_site_ledger(site, policy)

            if train_cfg.compile != "off":  # the site's --compile: said in its log, not silently dropped
                log(WARNING, "[fedvlsm site] compile=%s does not apply to DP-SGD rounds (Opacus' per-sample "
                    "gradients run eagerly in fp32)", train_cfg.compile)
            try:
                result, report = fit_private(model, train_ds, frozen.tokenizer, train_cfg, DPSettings.from_config(cfg),
                                             state_path, server_round=server_round,
                                             prox_reference=shared_in if mu > 0 else None, policy=policy)
            except BudgetExhausted as err:
                raise SiteRefusal(err.reason) from err
            privacy = report.as_metrics()
            log(INFO, "[fedvlsm site] round %s: DP-SGD train loss %.4f, epsilon %.3f (kept at this site)",
                server_round, result.train_loss, report.epsilon)
        else:
            result = fit(
                model,
                train_ds,
                None,  # validation is the evaluate round's job, on the global adapter
                frozen.tokenizer,
                train_cfg,
                prox_reference=shared_in if mu > 0 else None,
            )
        shared_out, personal_out = split_personal(model.adapter_state(), cfg.personal)
    site.save_personal(run_name, server_round, personal_out, run_id)
    # The update (local - received global) in fp32, then encoded: int8's
    # stochastic rounding is seeded like the training, so a resumed run
    # sends bit-identical updates.
    update = update_of(shared_out, start_shared)
    if cfg.dp == "client" and cfg.dp_clipping == "client":
        # Client-level DP, clipped here: in fp32, before any wire encoding
        # (an fp16 norm overflows above ~256 and would zero the update).
        from common.privacy import clip_update_fp32

        update = clip_update_fp32(update, cfg.dp_clip_norm)
    wire = encode_update(update, cfg.payload_dtype, seed=seed)
    metrics = {
        "num-examples": result.num_examples,
        # Sample-level DP: the training loss is a figure of the private images with no noise in it
        # (the accountant covers the update only), so it stays home, in the site's log.
        **({} if cfg.dp == "sample" else {"train-loss": result.train_loss}),
        "train-seconds": result.seconds,
        "steps": result.steps,
        "payload-bytes-down": bytes_down,
        "payload-bytes-up": payload_bytes(wire),
        "site-rounds-trained": _bump_rounds_trained(context),
        **({} if personal_from is None else {"personal-from": personal_from}),
        "handler-seconds": time.time() - start,
        **privacy,
        **_runtime_metrics(start),
    }
    return _reply(msg, site, metrics, wire)


@served("evaluate")
def evaluate(msg: Message, context: Context) -> Message:
    start = time.time()
    cfg, site, frozen, server_round, run_name = _setup(msg, context)
    shared_in, bytes_down = _received(msg)
    val_ds = site.dataset("val", frozen, train=False)
    train_cfg = _train_config(cfg, 1, cfg.seed)
    # The round record keeps Dice and loss only: skip HD95 (the costliest metric by far).
    with site.leased_model(frozen, shared_in) as model:
        global_result = evaluate_model(model, val_ds, frozen.tokenizer, train_cfg, hd95=False)
    personal = site.load_personal(run_name, server_round + 1, _run_id(msg))
    personal_result = global_result
    if personal:
        with site.leased_model(frozen, shared_in, personal) as model:
            personal_result = evaluate_model(model, val_ds, frozen.tokenizer, train_cfg, hd95=False)
    metrics = {
        "num-examples": global_result.n,
        "dice": global_result.dice,
        "dice-personal": personal_result.dice,
        "loss": global_result.loss,
        "payload-bytes-down": bytes_down,
        "handler-seconds": time.time() - start,
        **_runtime_metrics(start),
    }
    return _reply(msg, site, metrics)


@served("final evaluation")
def evaluate_final(msg: Message, context: Context) -> Message:
    start = time.time()
    cfg, site, frozen, server_round, run_name = _setup(msg, context)
    shared_in, _ = _received(msg)
    test_ds = site.dataset("test", frozen, train=False)
    train_cfg = _train_config(cfg, 1, cfg.seed)

    def dice(model) -> float:
        return evaluate_model(model, test_ds, frozen.tokenizer, train_cfg).dice

    base_model = build_model(frozen, AdapterSpec(variant="none"))
    personal_model = site.model(frozen, shared_in, site.load_personal(run_name, server_round + 1, _run_id(msg)))
    metrics = {
        "num-examples": len(test_ds),
        "dice-base": dice(base_model),
        "dice-global": dice(site.model(frozen, shared_in)),
        "dice-personal": dice(personal_model),
    }
    if cfg.finetune_epochs and site.policy.demands_dp:
        # Fine-tuning is plain SGD on the training images: a site whose own terms demand DP
        # never trains without it, whatever the run asks (the comparison falls back to dice-personal).
        log(WARNING, "[fedvlsm site] finetune-epochs = %s skipped: this site's node config sets dp-require "
            "or dp-site-budget, and fine-tuning is not DP-SGD", cfg.finetune_epochs)
    elif cfg.finetune_epochs:
        seed = _local_seed(cfg, server_round + 1, site.name)
        fit(personal_model, site.dataset("train", frozen, train=True, seed=seed), None, frozen.tokenizer,
            _train_config(cfg, cfg.finetune_epochs, seed))
        metrics["dice-finetuned"] = dice(personal_model)
    metrics["handler-seconds"] = time.time() - start
    return _reply(msg, site, {**metrics, **_runtime_metrics(start)})


@served("local-only training")
def train_local_only(msg: Message, context: Context) -> Message:
    start = time.time()
    cfg, site, frozen, _, _ = _setup(msg, context)
    if site.policy.demands_dp:
        # A local-only adapter is trained without DP-SGD and charged to no accountant: a site whose
        # own terms demand DP refuses it like any other training that is not sample-level DP.
        raise SiteRefusal("site policy: this site trains only with dp = 'sample'",
                          "train.local_only trains without DP-SGD; this site's node config sets dp-require or "
                          "dp-site-budget, so it trains no adapter outside DP-SGD")
    epochs = int(msg.content[Rec.CONFIG]["epochs"])
    seed = _local_seed(cfg, 0, site.name)
    model = site.model(frozen)
    result = fit(model, site.dataset("train", frozen, train=True, seed=seed), None, frozen.tokenizer,
                 _train_config(cfg, epochs, seed))
    test = evaluate_model(model, site.dataset("test", frozen, train=False), frozen.tokenizer,
                          _train_config(cfg, 1, seed))
    metrics = {
        "num-examples": result.num_examples,
        "dice-local": test.dice,
        "train-seconds": result.seconds,
        "handler-seconds": time.time() - start,
        **_runtime_metrics(start),
    }
    return _reply(msg, site, metrics)



# message_type -> handler: the one table both paths use (client_app.py in-process, worker.py warm).
HANDLERS: dict[str, Handler] = {
    "train": train,
    "evaluate": evaluate,
    "evaluate.final": evaluate_final,
    "train.local_only": train_local_only,
}


def handle(msg: Message, context: Context) -> Message:
    """Run the handler for `msg`'s message type (an unknown type gets an error reply)."""
    handler = HANDLERS.get(msg.metadata.message_type)
    if handler is None:
        return error_reply(msg, context, f"protocol: unknown message type {msg.metadata.message_type!r}")
    return handler(msg, context)
