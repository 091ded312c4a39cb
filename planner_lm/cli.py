"""Command lines of the stages: YAML configs plus command-line overrides, help on every option.

- `parse_config(ConfigClass, ...)`: plain (non-training) stages described by a dataclass.
- `build_cli(StageSpec(...))`: Lightning stages, a `LightningCLI` subclass that adds the run
  directory, refuses to overwrite a finished stage made with another config, links facts read
  from upstream manifests into the model (never typed by the user), and gives every stage the
  same TensorBoard logger and resumable checkpoints under its stage directory.

Both accept `--config FILE` any number of times (later files override earlier ones) and
`--print_config` to show the resolved configuration.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from planner_lm.artifacts import _jsonable, atomic_write_text, config_hash, manifest_hash, write_manifest
from planner_lm.errors import friendly_errors
from planner_lm.hardware import fast_precision
from planner_lm.quiet import quiet_upstream
from planner_lm.ownership import check_stage, start_stage
from planner_lm.run_folder import stage_dir
from planner_lm.seeding import DEFAULT_SEED

T = TypeVar("T")


def parse_config(config_class: type[T], description: str, args: Sequence[str] | None = None) -> T:
    """Parse `--config` files and overrides into an instance of a (nested) config dataclass."""
    quiet_upstream()
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(description=description, exit_on_error=True)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config file; may repeat, later files win.")
    parser.add_class_arguments(config_class, None)
    namespace = parser.parse_args(args)
    namespace.pop("config", None)
    init = parser.instantiate(namespace) if hasattr(parser, "instantiate") else parser.instantiate_classes(namespace)
    init = init.as_dict() if hasattr(init, "as_dict") else dict(init)
    # nested dataclasses come back instantiated; rebuild the top-level one
    return config_class(**{k: v for k, v in init.items() if k != "__path__"})


@dataclass
class StageSpec:
    """What a Lightning stage needs from the command line.

    Attributes:
        stage: a stage name (`planner_lm.run_folder.STAGE_DIRS`, or `finetune_joint`).
        model_class / datamodule_class: the LightningModule and LightningDataModule.
        description: first line of `--help`.
        links: (source, target) pairs linked at instantiation, e.g.
            ("data.num_actions", "model.num_actions"): facts the data module reads from
            upstream manifests flow into the model's constructor.
        output_dir: derives the stage directory from the parsed config (default:
            `stage_dir(run_dir, stage)`), e.g. for `4_joint-<selection>`.
        epochs_when_unbounded: training stages: epochs to run when neither `trainer.max_epochs`
            nor `trainer.max_steps` is given (Lightning would run 1,000), e.g. without `--config`.
    """

    stage: str
    model_class: type
    datamodule_class: type | None
    description: str
    links: tuple[tuple[str, str], ...] = ()
    output_dir: Callable[[Any], Path] | None = None
    trainer_defaults: dict[str, Any] = field(default_factory=dict)
    epochs_when_unbounded: int | None = None


def _make_stage_cli_class():
    from lightning.pytorch.cli import LightningCLI

    class StageCLI(LightningCLI):
        """LightningCLI with the run directory, manifest-derived links and stage-local outputs."""

        spec: StageSpec
        output_dir: Path

        def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 - LightningArgumentParser
            parser.add_argument("--run_dir", type=str, default="runs/demo",
                                help="Run directory holding every stage's output (make: RUN=...).")
            parser.add_argument("--overwrite", type=bool, default=False,
                                help="Replace a finished run of this stage made with a different config.")
            parser.add_argument("--checkpoint_every_n_steps", type=int, default=0,
                                help="Also save checkpoints/last.ckpt every N optimizer steps (0: off). It is "
                                     "always saved at each validation and epoch end.")
            parser.add_argument("--checkpoint_every_minutes", type=float, default=10.0,
                                help="Also save checkpoints/last.ckpt when this many minutes passed since the "
                                     "last save (0: off), so a crash loses at most that much work.")
            if self.datamodule_class is not None and _has_init_arg(self.datamodule_class, "run_dir"):
                parser.link_arguments("run_dir", "data.run_dir")
            for source, target in self.spec.links:
                parser.link_arguments(source, target, apply_on="instantiate")

        def before_instantiate_classes(self) -> None:
            cfg = self.config
            trainer = cfg.trainer
            if self.spec.epochs_when_unbounded and trainer.max_epochs is None and trainer.max_steps in (None, -1):
                trainer.max_epochs = self.spec.epochs_when_unbounded  # recorded in the manifest as run
            out = self.spec.output_dir(cfg) if self.spec.output_dir else stage_dir(cfg.run_dir, self.spec.stage)
            self.output_dir = Path(out)
            # refuse before heavy work, on every process; nothing is written yet
            check_stage(self.output_dir, stage=self.spec.stage, config=self.config_dict, overwrite=cfg.overwrite)

        def instantiate_classes(self) -> None:
            """Instantiate model, data and trainer; then global rank 0 (known once the trainer
            exists) prepares the stage folder while the other processes wait for it."""
            super().instantiate_classes()
            from planner_lm.rank_zero import decided_on_rank_zero

            def prepare() -> str:
                return str(start_stage(self.output_dir, stage=self.spec.stage, config=self.config_dict,
                                       overwrite=self.config.overwrite))

            decided_on_rank_zero(self.trainer, f"start {self.output_dir.resolve()}", prepare)

        @property
        def config_dict(self) -> dict[str, Any]:
            """The resolved config as plain JSON-able data (recorded in the manifest)."""
            return _jsonable(self.config)

        def instantiate_trainer(self, **kwargs: Any):
            from lightning.pytorch.callbacks import Checkpoint
            from lightning.pytorch.loggers import TensorBoardLogger

            from planner_lm.lit.callbacks import LastValidation
            from planner_lm.lit.checkpointing import FiniteLossGuard, ResumeCheckpoint, StepSeed

            trainer_cfg = self.config_init.get("trainer", {})
            kwargs.setdefault("default_root_dir", str(self.output_dir))
            if trainer_cfg.get("logger") in (None, True):
                kwargs["logger"] = TensorBoardLogger(save_dir=str(self.output_dir), name="tb", version="")
            callbacks = list(trainer_cfg.get("callbacks") or [])
            if trainer_cfg.get("enable_checkpointing", True) is not False and not any(
                isinstance(cb, Checkpoint) for cb in callbacks
            ):
                callbacks.append(ResumeCheckpoint(self.output_dir / "checkpoints",
                                                  every_n_steps=self.config.checkpoint_every_n_steps,
                                                  every_minutes=self.config.checkpoint_every_minutes))
            callbacks += [StepSeed(), FiniteLossGuard(), LastValidation()]
            kwargs["callbacks"] = callbacks
            return super().instantiate_trainer(**kwargs)

    return StageCLI


def _has_init_arg(cls: type, name: str) -> bool:
    import inspect

    return name in inspect.signature(cls.__init__).parameters


def build_cli(spec: StageSpec, args: Sequence[str] | None = None):
    """Parse the command line of a Lightning stage and instantiate model, data and trainer.

    Returns the CLI object: `.model`, `.datamodule`, `.trainer`, `.output_dir`, `.config_dict`.
    The caller runs `fit`/`predict` (typically with `ckpt_path=resume_checkpoint(cli, data.inputs)`)
    and ends with `finish_stage`.
    """
    quiet_upstream()
    cls = _make_stage_cli_class()
    cls.spec = spec
    # bf16 autocast where the hardware has it natively (GPUs, AVX512-BF16/AMX CPUs), else fp32;
    # a stage that must stay exact (k-means) says so in its own defaults
    trainer_defaults = {"enable_model_summary": False, "precision": fast_precision(), **spec.trainer_defaults}
    return cls(
        spec.model_class,
        spec.datamodule_class,
        run=False,
        args=list(args) if args is not None else None,  # None: LightningCLI reads sys.argv
        save_config_callback=None,
        seed_everything_default=DEFAULT_SEED,
        trainer_defaults=trainer_defaults,
        parser_kwargs={"description": spec.description},
    )


RESUME_RECORD = "resume.json"


def _resume_identity(cli: Any, inputs: Mapping[str, str | os.PathLike]) -> dict[str, Any]:
    """What a checkpoint must have been trained from to be resumed: upstream manifests and config
    (`config_hash` ignores options that do not change the outputs, such as checkpoint intervals)."""
    return {"upstream": {name: manifest_hash(path) for name, path in sorted(inputs.items())},
            "config_hash": config_hash(cli.config_dict)}


def resume_checkpoint(cli: Any, inputs: Mapping[str, str | os.PathLike]) -> str | None:
    """`checkpoints/last.ckpt` of an interrupted run of this stage, if it can be resumed, else None.

    The checkpoint directory records the upstream manifests and the config it was trained from
    (`checkpoints/resume.json`); if either changed since, the stale checkpoint is deleted and the
    stage starts over, so a resumed run never mixes two configurations or two inputs. Global rank 0
    decides (and cleans up); every process resumes from the same answer.
    """
    from planner_lm.lit.checkpointing import LAST_CHECKPOINT, PARTIAL_CHECKPOINT
    from planner_lm.rank_zero import decided_on_rank_zero

    folder = Path(cli.output_dir) / "checkpoints"
    record, last = folder / RESUME_RECORD, folder / LAST_CHECKPOINT
    identity = _resume_identity(cli, inputs)

    def decide() -> str | None:
        saved = None
        if record.is_file():
            try:
                saved = json.loads(record.read_text())
            except (OSError, json.JSONDecodeError):
                pass
        if saved != identity:
            if last.is_file():
                print(f"{folder} holds a run from other inputs or another config; starting over")
            for stale in (last, folder / PARTIAL_CHECKPOINT, record):  # only the files this project writes
                stale.unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record, json.dumps(identity, indent=2) + "\n")
        if not last.is_file():
            return None
        from planner_lm.lit.checkpointing import check_checkpoint

        check_checkpoint(last)  # the stage resumes with fit(..., weights_only=True): refuse anything else clearly
        return str(last)

    return decided_on_rank_zero(cli.trainer, f"resume {folder.resolve()}", decide)


def final_validation(trainer: Any, model: Any, datamodule: Any) -> dict[str, float]:
    """Validation metrics of the final weights: those of fit's last validation if it ran at the
    final step (no second pass over the validation set), otherwise a fresh `trainer.validate`."""
    from planner_lm.lit.callbacks import LastValidation

    recorder = next((cb for cb in trainer.callbacks if isinstance(cb, LastValidation)), None)
    if recorder is not None and recorder.step == trainer.global_step and recorder.metrics:
        return dict(recorder.metrics)
    return trainer.validate(model, datamodule=datamodule, verbose=False)[0]


def finish_stage(cli: Any, *, inputs: Mapping[str, str | os.PathLike], outputs: Sequence[str],
                 facts: Mapping[str, Any], metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Write the stage's manifest (last, atomically) with the resolved config and seed; return it."""
    return write_manifest(cli.output_dir, stage=cli.spec.stage, config=cli.config_dict, inputs=inputs,
                          outputs=list(outputs), facts=facts, metrics=metrics, seed=cli.config.get("seed_everything"))


def stage_main(run: Callable[[list[str] | None], Any]) -> Callable[[list[str] | None], None]:
    """The `main` of a stage script: `run` with user errors shown as one line and exit code 2."""
    def main(args: list[str] | None = None) -> None:
        with friendly_errors():
            run(args)

    main.__doc__ = f"Command-line entry point of `{run.__module__}`: {(run.__doc__ or '').strip()}"
    return main
