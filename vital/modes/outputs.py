"""What a run leaves on disk: step PNGs, final.png, final_alpha.png, a strip of the steps,
config.json and metrics.json. Writes are atomic where a half-written file would mislead, and a
full disk is reported without losing what is already saved.
"""
from __future__ import annotations

import errno
from pathlib import Path

import torch
from PIL import Image

from vital.cache import write_json
from vital.imaging import grid, rgba, save_png, to_pil


class RunWriter:
    """Collects a run's outputs in ``run_dir``; ``on_step`` is the render loop's callback."""

    def __init__(self, run_dir: Path, metadata: dict):
        self.run_dir = Path(run_dir)
        (self.run_dir / "steps").mkdir(parents=True, exist_ok=True)
        self.metadata = metadata
        self.records: list[dict] = []
        self.step_files: list[Path] = []
        write_json(self.run_dir / "config.json", metadata)

    def on_step(self, step: int, image: torch.Tensor, record: dict) -> None:
        path = self.run_dir / "steps" / f"step_{step:04d}.png"
        try:
            save_png(to_pil(image), path)
            self.step_files.append(path)
        except OSError as err:
            record["save_error"] = str(err)
        self.records.append(record)
        self._write_metrics(status="running")

    def fail(self, err: BaseException) -> None:
        """Record in metrics.json why the run ended without finishing (an exception, Ctrl-C or
        SIGTERM outside the optimisation, a full disk)."""
        if isinstance(err, KeyboardInterrupt):
            status = getattr(err, "stopped_as", "interrupted")
        elif isinstance(err, OSError) and err.errno == errno.ENOSPC:
            status = f"failed: the disk is full ({err.filename or err})"
        else:
            status = f"failed: {type(err).__name__}: {err}"
        self._write_metrics(status=status)

    def _write_metrics(self, **extra) -> None:
        try:
            write_json(self.run_dir / "metrics.json", {**extra, "steps": self.records})
        except OSError:
            pass  # the disk is full: the PNGs already written stay, the caller reports

    def _write_strip_and_animation(self) -> None:
        """steps_strip.png (the last 8 saved steps, labelled) and steps.gif (all of them)."""
        if not self.step_files:
            return
        frames = [Image.open(p).convert("RGB") for p in self.step_files]
        labels = [p.stem.replace("step_", "") for p in self.step_files]
        save_png(grid(frames[-8:], labels[-8:]), self.run_dir / "steps_strip.png")
        try:
            frames[0].save(self.run_dir / "steps.gif", save_all=True, append_images=frames[1:],
                           duration=250, loop=0)
        except OSError as err:
            print(f"warning: could not write steps.gif: {err}")

    def finish(self, result, extra: dict | None = None) -> Path:
        """Write final.png, final_alpha.png, steps_strip.png and metrics.json; return final.png."""
        final = self.run_dir / "final.png"
        save_png(to_pil(result.image), final)
        save_png(rgba(result.image[0], result.alpha[0]), self.run_dir / "final_alpha.png")
        if result.image.shape[0] > 1:
            batch = [to_pil(im) for im in result.image]
            save_png(grid(batch), self.run_dir / "final_batch.png")
        self._write_strip_and_animation()
        status = result.stopped or "finished"
        early = {"early_stopped": result.early_stopped} if result.early_stopped else {}
        self._write_metrics(status=status, steps_done=result.steps_done,
                            seconds_per_step=result.step_seconds, **early, **(extra or {}))
        return final
