"""Train a model from configs, the official way (PyTorch Lightning 2):

    python main.py --base configs/latent-diffusion/my.yaml -t --devices 1 [key=value ...]
    python main.py --resume logs/<run>            # or logs/<run>/checkpoints/<file>.ckpt

Configs merge left to right, then ``key=value`` overrides. ``model`` (with ``base_learning_rate``),
``data`` (``main.DataModuleFromConfig``) and ``lightning`` (``trainer``, ``callbacks``,
``modelcheckpoint``, ``logger``) sections as in the official configs. Each run writes
``<logdir>/<now>_<name>/`` with ``configs/``, ``checkpoints/`` (``last.ckpt`` and the best by the
model's ``monitor``), ``images/`` and ``csv/`` logs. Ctrl-C, SIGTERM or an error save ``last.ckpt``;
SIGUSR1 saves it after the current batch and training goes on.
"""
import argparse
import datetime
import logging
import os
import pickle
import shutil
import signal
import sys
from pathlib import Path

from ldm.callbacks import CUDACallback, ImageLogger, SetupCallback  # noqa: F401 (official targets main.*)
from ldm.data.datamodule import DataModuleFromConfig, WrappedDataset  # noqa: F401 (official targets main.*)
from ldm.cli import TRUST_CONFIG_ADVICE
from ldm.config_safety import UntrustedConfigError, check_config_targets, trusting_configs
from ldm.errors import UserError

logger = logging.getLogger("main")

EXIT_USER_ERROR = 2
EXIT_CODES = {"keyboard": 130, "sigterm": 143}
# Lightning re-runs this script for ranks > 0 under DDP; they must use rank 0's run folder
RUN_NOW_ENV = "LDM_MAIN_RUN_NOW"


def count_or_fraction(text):
    """Lightning reads an int as a number of batches and a float as a fraction: keep "4" an int."""
    try:
        return int(text)
    except ValueError:
        return float(text)


TRAINER_FLAGS = {  # flag: type; given flags override lightning.trainer.<flag>
    "accelerator": str, "devices": str, "strategy": str, "num_nodes": int, "precision": str, "max_steps": int,
    "max_epochs": int, "accumulate_grad_batches": int, "limit_train_batches": count_or_fraction,
    "limit_val_batches": count_or_fraction, "val_check_interval": count_or_fraction,
    "check_val_every_n_epoch": int, "log_every_n_steps": int, "num_sanity_val_steps": int,
    "gradient_clip_val": float,
}


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(message)


BOOL_WORDS = {"yes": True, "true": True, "t": True, "y": True, "1": True,
              "no": False, "false": False, "f": False, "n": False, "0": False}
BOOL_FLAGS = ("-t", "--train", "--no-test", "-d", "--debug", "--scale_lr")


def str2bool(v):
    if isinstance(v, bool):
        return v
    if v.lower() in BOOL_WORDS:
        return BOOL_WORDS[v.lower()]
    raise argparse.ArgumentTypeError("Boolean value expected.")


def explicit_bools(argv):
    """``-t model.x=1`` means ``-t true model.x=1``: argparse would take the override as the flag's value."""
    out = []
    for i, item in enumerate(argv):
        out.append(item)
        following = argv[i + 1] if i + 1 < len(argv) else None
        if item in BOOL_FLAGS and following is not None and not following.startswith("-") \
                and following.lower() not in BOOL_WORDS:
            out.append("true")
    return out


def get_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("-n", "--name", type=str, const=True, default="", nargs="?", help="postfix for the run folder")
    add("-r", "--resume", type=str, const=True, default="", nargs="?", help="resume from a run folder or checkpoint")
    add("-b", "--base", nargs="*", metavar="base_config.yaml", default=list(),
        help="configs, merged left to right; key=value arguments override them")
    add("-t", "--train", type=str2bool, const=True, default=False, nargs="?", help="train")
    add("--no-test", type=str2bool, const=True, default=False, nargs="?", help="skip the test split")
    add("-d", "--debug", type=str2bool, nargs="?", const=True, default=False,
        help="move the run folder to <logdir>/debug_runs afterwards")
    add("-s", "--seed", type=int, default=23, help="seed for seed_everything")
    add("-f", "--postfix", type=str, default="", help="post-postfix for the run folder name")
    add("-l", "--logdir", type=str, default="logs", help="where run folders are created")
    add("--scale_lr", type=str2bool, nargs="?", const=True, default=True,
        help="lr = accumulate_grad_batches * devices * batch_size * base_learning_rate (default)")
    add("--gpus", type=str, default=None, help="legacy: '0,1,' means --accelerator gpu --devices 0,1")
    add("--trust-config", action="store_true",
        help="build any target the configs name; without it only ldm.*, torch.nn.* and Lightning "
             "callback/logger classes, since a config can run any code")
    for flag, kind in TRAINER_FLAGS.items():
        add(f"--{flag}", type=kind, default=None, help=f"Trainer({flag}=...)")
    return parser


def parse_args(argv):
    opt, unknown = get_parser().parse_known_args(explicit_bools(argv))
    for item in unknown:
        if item.startswith("-") or "=" not in item:
            raise UserError(f"unrecognized argument '{item}' (config overrides are written key=value)")
    if opt.name and opt.resume:
        raise UserError("-n/--name and -r/--resume cannot be used together; to continue in a new run folder, "
                        "pass the checkpoint as model.params.ckpt_path=... with -n")
    if not opt.base and not opt.resume:
        raise UserError("no config: pass --base CONFIG.yaml (or --resume a run folder)")
    if opt.resume and not opt.train:
        # the official behaviour (load, and test where the config has a test split), but an easy slip
        logger.warning("--resume without -t trains nothing; add -t to continue the training")
    return opt, unknown


def resolve_run(opt, now):
    """(logdir, ckpt or None, name) of this run; resuming reuses the run folder and its saved configs."""
    if opt.resume:
        path = Path(opt.resume)
        if not path.exists():
            raise UserError(f"cannot resume from '{opt.resume}': it does not exist; pass a run folder "
                            f"(logs/<run>) or a checkpoint inside its checkpoints/")
        if path.is_file():
            if "checkpoints" not in path.parts:
                raise UserError(f"cannot resume from '{opt.resume}': the checkpoint must sit in a run's "
                                f"checkpoints/ folder (to start a new run from it, use model.params.ckpt_path)")
            parts = path.parts
            logdir = Path(*parts[:len(parts) - 1 - parts[::-1].index("checkpoints")])
            ckpt = path
        else:
            logdir = path
            ckpt = logdir / "checkpoints" / "last.ckpt"
            if not ckpt.is_file():
                raise UserError(f"cannot resume from '{opt.resume}': {ckpt} does not exist")
        saved = sorted((logdir / "configs").glob("*.yaml"))
        if not saved:
            raise UserError(f"cannot resume from '{opt.resume}': no configs in {logdir / 'configs'}")
        opt.base = [str(p) for p in saved] + list(opt.base)
        return logdir, ckpt, logdir.name
    if opt.name:
        name = "_" + opt.name
    else:
        name = "_" + Path(opt.base[0]).stem
    nowname = now + name + opt.postfix
    return Path(opt.logdir) / nowname, None, nowname


def load_configs(paths, overrides):
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    bad_input = (OmegaConfBaseException, yaml.YAMLError, ValueError, UnicodeDecodeError)
    configs = []
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"config '{path}' does not exist")
        try:
            configs.append(OmegaConf.load(path))
        except bad_input as err:
            raise UserError(f"config '{path}' is not valid YAML ({str(err).splitlines()[0]})") from None
    try:
        cli = OmegaConf.from_dotlist(list(overrides))
        config = OmegaConf.merge(*configs, cli)
    except bad_input as err:
        raise UserError(f"bad config override ({str(err).splitlines()[0]})") from None
    for section in ("model", "data"):
        if section not in config:
            raise UserError(f"the merged config has no '{section}' section")
    return config


def trainer_config_from(opt, lightning_config):
    """lightning.trainer with the given CLI flags applied on top (``--gpus`` mapped to accelerator/devices)."""
    from omegaconf import OmegaConf
    trainer_section = lightning_config.get("trainer")
    trainer_config = OmegaConf.to_container(trainer_section, resolve=True) if trainer_section else {}
    for flag in TRAINER_FLAGS:
        if getattr(opt, flag) is not None:
            trainer_config[flag] = getattr(opt, flag)
    gpus = opt.gpus if opt.gpus is not None else trainer_config.pop("gpus", None)
    trainer_config.pop("gpus", None)
    if gpus is not None:
        ids = [int(g) for g in str(gpus).strip(",").split(",") if g.strip()]
        trainer_config["accelerator"] = "gpu"
        trainer_config["devices"] = ids
    if isinstance(trainer_config.get("devices"), str) and trainer_config["devices"].isdigit():
        trainer_config["devices"] = int(trainer_config["devices"])
    trainer_config.setdefault("devices", 1)  # several devices only when asked for
    lightning_config["trainer"] = trainer_config
    return dict(trainer_config)


def checkpoint_monitor(model):
    """The model's ``monitor``, minus a ``_ema`` suffix when the model keeps no EMA (nothing logs it then)."""
    monitor = getattr(model, "monitor", None)
    if monitor and monitor.endswith("_ema") and not getattr(model, "use_ema", True):
        logger.warning("monitor %s needs use_ema: True; monitoring %s instead", monitor, monitor[:-4])
        monitor = monitor[:-4]
    return monitor


def build_callbacks(lightning_config, model, ckptdir, setup_callback):
    from omegaconf import OmegaConf
    from ldm.util import instantiate_from_config
    modelckpt = {"target": "pytorch_lightning.callbacks.ModelCheckpoint",
                 "params": {"dirpath": str(ckptdir), "filename": "{epoch:06}", "verbose": True, "save_last": True}}
    monitor = checkpoint_monitor(model)
    if monitor:
        logger.info("monitoring %s as checkpoint metric", monitor)
        # the step in the name keeps the best three of one long epoch apart (epoch=000000-v1.ckpt says nothing)
        modelckpt["params"].update(monitor=monitor, save_top_k=3, filename="{epoch:06}-{step:07}")
    defaults = {
        "image_logger": {"target": "ldm.callbacks.ImageLogger",
                         "params": {"batch_frequency": 750, "max_images": 4, "clamp": True}},
        "learning_rate_logger": {"target": "pytorch_lightning.callbacks.LearningRateMonitor",
                                 "params": {"logging_interval": "step"}},
        "cuda_callback": {"target": "ldm.callbacks.CUDACallback"},
        "checkpoint_callback": OmegaConf.merge(modelckpt, lightning_config.get("modelcheckpoint") or {}),
    }
    user = lightning_config.get("callbacks") or OmegaConf.create()
    if "metrics_over_trainsteps_checkpoint" in user:
        logger.warning("saving checkpoints every n train steps without deleting any: this needs disk space")
        defaults["metrics_over_trainsteps_checkpoint"] = {
            "target": "pytorch_lightning.callbacks.ModelCheckpoint",
            "params": {"dirpath": str(Path(ckptdir) / "trainstep_checkpoints"), "filename": "{epoch:06}-{step:09}",
                       "verbose": True, "save_top_k": -1, "every_n_train_steps": 10000, "save_weights_only": True}}
    callbacks_cfg = OmegaConf.merge(defaults, user)
    return [setup_callback] + [instantiate_from_config(callbacks_cfg[k]) for k in callbacks_cfg]


def build_loggers(lightning_config, logdir):
    from pytorch_lightning.loggers import CSVLogger
    from ldm.util import instantiate_from_config
    if lightning_config.get("logger"):
        from omegaconf import OmegaConf
        default = {"params": {"save_dir": str(logdir)}}
        return [instantiate_from_config(OmegaConf.merge(default, lightning_config.logger))]
    loggers = [CSVLogger(save_dir=str(logdir), name="csv")]
    try:
        from pytorch_lightning.loggers import TensorBoardLogger
        loggers.append(TensorBoardLogger(save_dir=str(logdir), name="tensorboard"))
    except ModuleNotFoundError:
        pass
    return loggers


def make_trainer(trainer_kwargs):
    import pytorch_lightning as pl
    try:
        return pl.Trainer(**trainer_kwargs)
    except TypeError as err:
        if "unexpected keyword argument" in str(err):
            raise UserError(f"lightning.trainer: {err} (Lightning 2 Trainer arguments only)") from None
        raise
    except (ValueError, pl.utilities.exceptions.MisconfigurationException) as err:
        raise UserError(f"lightning.trainer: {str(err).splitlines()[0]}") from None


def set_learning_rate(model, config, trainer, trainer_config, scale_lr):
    if "base_learning_rate" not in config.model:
        raise UserError("model.base_learning_rate is missing from the config")
    base_lr = float(config.model.base_learning_rate)
    bs = int(config.data.params.batch_size)
    accumulate = int(trainer_config.get("accumulate_grad_batches") or 1)
    n_devices = trainer.num_devices * trainer.num_nodes
    if scale_lr:
        model.learning_rate = accumulate * n_devices * bs * base_lr
        logger.info("Setting learning rate to %.2e = %d (accumulate_grad_batches) * %d (num_devices) * %d "
                    "(batchsize) * %.2e (base_lr)", model.learning_rate, accumulate, n_devices, bs, base_lr)
    else:
        model.learning_rate = base_lr
        logger.info("++++ NOT USING LR SCALING ++++")
        logger.info("Setting learning rate to %.2e", model.learning_rate)


def train(opt, unknown):
    import pytorch_lightning as pl
    from omegaconf import OmegaConf
    from pytorch_lightning.utilities.model_helpers import is_overridden
    from ldm.util import instantiate_from_config

    now = os.environ.get(RUN_NOW_ENV) or datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    logdir, ckpt, _ = resolve_run(opt, now)
    ckptdir, cfgdir = logdir / "checkpoints", logdir / "configs"
    pl.seed_everything(opt.seed)
    config = load_configs(opt.base, unknown)
    if not opt.trust_config:
        check_config_targets(config, source=", ".join(opt.base))
    lightning_config = config.pop("lightning", OmegaConf.create())
    trainer_config = trainer_config_from(opt, lightning_config)

    model = instantiate_from_config(config.model)
    data = instantiate_from_config(config.data)
    data.prepare_data()
    data.setup()
    for split, dataset in getattr(data, "datasets", {}).items():
        logger.info("data %s: %s, %d examples", split, dataset.__class__.__name__, len(dataset))

    setup_callback = SetupCallback(resume=bool(opt.resume), now=now, logdir=logdir, ckptdir=ckptdir, cfgdir=cfgdir,
                                   config=config, lightning_config=lightning_config)
    trainer_kwargs = dict(trainer_config, default_root_dir=str(logdir), logger=build_loggers(lightning_config, logdir),
                          callbacks=build_callbacks(lightning_config, model, ckptdir, setup_callback))
    trainer = make_trainer(trainer_kwargs)
    set_learning_rate(model, config, trainer, trainer_config, opt.scale_lr)

    own_env = RUN_NOW_ENV not in os.environ
    os.environ[RUN_NOW_ENV] = now
    previous_usr1 = signal.signal(signal.SIGUSR1, setup_callback.request_checkpoint) if hasattr(signal, "SIGUSR1") \
        else None
    previous_int = signal.getsignal(signal.SIGINT)
    try:
        if opt.train:
            trainer.fit(model, data, ckpt_path=str(ckpt) if ckpt else None, weights_only=True)
        if not opt.no_test and not trainer.interrupted and "test" in data.dataset_configs \
                and is_overridden("test_step", model):
            trainer.test(model, data)
    except SystemExit:
        # Lightning turns Ctrl-C into sys.exit(1) and SIGTERM into SIGTERMException after on_exception ran
        if setup_callback.interruption not in EXIT_CODES:
            raise
    except pickle.UnpicklingError as err:
        raise UserError(f"checkpoint '{ckpt}' cannot be loaded safely (weights only): {err}") from None
    finally:
        if own_env:
            os.environ.pop(RUN_NOW_ENV, None)
        if previous_usr1 is not None:
            signal.signal(signal.SIGUSR1, previous_usr1)
        signal.signal(signal.SIGINT, previous_int)
        if opt.debug and not opt.resume and trainer.global_rank == 0 and logdir.exists():
            target = Path(opt.logdir) / "debug_runs" / logdir.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(logdir), str(target))
    if setup_callback.interruption in EXIT_CODES:
        logger.warning("training interrupted (%s) at global step %d; %s", setup_callback.interruption,
                       trainer.global_step, f"saved {setup_callback.saved_on_interrupt}"
                       if setup_callback.saved_on_interrupt else "nothing to save")
        return EXIT_CODES[setup_callback.interruption]
    return 0


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        opt, unknown = parse_args(sys.argv[1:] if argv is None else list(argv))
        with trusting_configs(opt.trust_config):
            return train(opt, unknown)
    except UntrustedConfigError as err:
        print(f"error: {err.advise(TRUST_CONFIG_ADVICE)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
