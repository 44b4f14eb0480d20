"""Hooks of akd runs: ``RichProgressHook`` (HOOKS), the console's progress display."""
from __future__ import annotations

from akd_cli.mm import compat

compat.apply()

from mmcv.runner import HOOKS, EpochBasedRunner, Hook, get_dist_info  # noqa: E402


@HOOKS.register_module()
class RichProgressHook(Hook):
    """Progress over all training iterations with ETA and the current losses (rank 0): a live bar
    on a terminal; where the output goes to a file (a Slurm log, CI), one line per epoch, or per
    tenth of the run for iteration-based runs."""

    def __init__(self, max_losses: int = 4):
        self.max_losses = max_losses
        self.progress = None
        self.console = None

    @staticmethod
    def _stage(runner) -> str:
        return f"epoch {runner.epoch + 1}" if isinstance(runner, EpochBasedRunner) else "iterations"

    def before_run(self, runner):
        if get_dist_info()[0] != 0:
            return
        from rich.progress import TextColumn

        from akd_cli.mm.console import progress, progress_console

        self.console = progress_console()
        if not self.console.is_terminal:
            return
        self.progress = progress(TextColumn("[bold]train[/] {task.fields[stage]}"), TextColumn("{task.fields[losses]}"))
        self.progress.start()
        self.task = self.progress.add_task("train", total=runner.max_iters, completed=runner.iter,
                                           stage=self._stage(runner), losses="")

    def _losses(self, runner) -> str:
        log_vars = (runner.outputs or {}).get("log_vars", {})
        shown = [k for k in log_vars if k == "loss" or k.startswith(("loss_akd", "loss_token"))]
        shown += [k for k in log_vars if k.startswith("loss") and k not in shown][: max(self.max_losses - len(shown), 0)]
        return " ".join(f"{k.replace('loss_', '')}={log_vars[k]:.4g}" for k in shown)

    def _print_line(self, runner, done: int):
        where = (f"epoch {runner.epoch + 1}/{runner.max_epochs}: " if isinstance(runner, EpochBasedRunner) else "")
        self.console.print(f"train {where}iteration {done}/{runner.max_iters} {self._losses(runner)}",
                           highlight=False, soft_wrap=True)

    def after_train_iter(self, runner):
        if self.progress is not None:
            self.progress.update(self.task, completed=runner.iter + 1, stage=self._stage(runner),
                                 losses=self._losses(runner))
        elif self.console is not None and not isinstance(runner, EpochBasedRunner):
            done, every = runner.iter + 1, max(1, runner.max_iters // 10)
            if done % every == 0 or done == runner.max_iters:
                self._print_line(runner, done)

    def after_train_epoch(self, runner):
        if self.console is not None and self.progress is None:
            self._print_line(runner, runner.iter)

    def after_run(self, runner):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
