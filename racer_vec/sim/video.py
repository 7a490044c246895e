"""Evaluation videos: highway-env frames under a text panel of per-step metrics, written as MP4.

No JAX here, and pygame/imageio are imported only when used: evaluation workers import this module
for `configure_headless`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import struct
import warnings
from pathlib import Path

import numpy as np

from racer_vec.write_failures import WriteFailed, writing

PANEL_HEIGHT = 40
"""Pixels of the text panel above each frame (two lines)."""
FONT_SIZE = 17
TEXT_COLOR = (235, 235, 235)
ALERT_COLOR = (255, 90, 80)
PANEL_COLOR = (25, 25, 25)


def configure_headless() -> None:
    """Let pygame render without a display, in this process and the workers it starts.

    SDL's "offscreen" driver, not "dummy": highway-env 1.12.1's viewer skips all drawing when
    SDL_VIDEODRIVER is "dummy" (its frames come out black). Must run before pygame's display starts.
    """
    os.environ["SDL_VIDEODRIVER"] = "offscreen"
    os.environ["PYGAME_HIDE_SUPPORT_PROMPT"] = "1"


@dataclasses.dataclass(frozen=True)
class FrameStats:
    """What the panel shows for one frame; `safety_reward` is None on the initial frame (no step yet)."""

    step: int
    speed: float
    safety_reward: float | None
    env_return: float
    training_return: float
    offroad: bool
    crashed: bool = False

    def lines(self) -> tuple[str, str]:
        safety = "-" if self.safety_reward is None else f"{self.safety_reward:+.3f}"
        status = ("offroad YES" if self.offroad else "offroad no") + ("   CRASHED" if self.crashed else "")
        return (
            f"step {self.step:4d}   speed {self.speed:5.1f} m/s   safety reward {safety}   {status}",
            f"env return {self.env_return:8.3f}   training return {self.training_return:8.3f}",
        )


class Overlay:
    """Draws a FrameStats panel above an RGB frame (H, W, 3) -> (H + PANEL_HEIGHT, W, 3)."""

    def __init__(self):
        configure_headless()
        import pygame

        pygame.font.init()
        self._pygame = pygame
        self.font = pygame.font.Font(None, FONT_SIZE)

    def _text(self, text: str, color) -> np.ndarray:
        surface = self.font.render(text, True, color, PANEL_COLOR)
        return self._pygame.surfarray.array3d(surface).swapaxes(0, 1)  # pygame is (W, H, C)

    def __call__(self, frame: np.ndarray, stats: FrameStats) -> np.ndarray:
        height, width, _ = frame.shape
        canvas = np.empty((height + PANEL_HEIGHT, width, 3), np.uint8)
        canvas[:PANEL_HEIGHT] = PANEL_COLOR
        canvas[PANEL_HEIGHT:] = frame
        alert = stats.crashed or stats.offroad
        for row, line in enumerate(stats.lines()):
            top = 4 + row * (PANEL_HEIGHT // 2)
            text = self._text(line, ALERT_COLOR if alert and row == 0 else TEXT_COLOR)
            text = text[: PANEL_HEIGHT - top, : width - 6]
            canvas[top : top + text.shape[0], 6 : 6 + text.shape[1]] = text
        return canvas


class VideoRecorder:
    """One MP4 per filmed episode, `<directory>/highway_eval_<label>_episode_<k>.mp4`, streamed to
    disk frame by frame (an episode's frames are never all held in memory)."""

    def __init__(self, directory: Path, label: str, fps: int):
        self.directory = Path(directory)
        self.label = label
        self.fps = fps
        self.overlay = Overlay()
        self._writers: dict = {}
        self.written: dict[int, Path] = {}

    def path(self, episode: int) -> Path:
        return self.directory / f"highway_eval_{self.label}_episode_{episode}.mp4"

    def add_frame(self, episode: int, frame: np.ndarray, stats: FrameStats) -> None:
        """One frame of `episode`'s video; WriteFailed when ffmpeg cannot write it (a full disk, say)."""
        image = self.overlay(frame, stats)
        with writing(self.path(episode)):
            self._add(episode, image)

    def _add(self, episode: int, image: np.ndarray) -> None:
        writer = self._writers.get(episode)
        if writer is not None:
            writer.append_data(image)
            return
        import imageio.v2 as imageio

        self.directory.mkdir(parents=True, exist_ok=True)
        # the frame sizes are even (as yuv420p needs): no resizing to 16-pixel blocks
        writer = imageio.get_writer(
            self.path(episode), fps=self.fps, codec="libx264", macro_block_size=2, ffmpeg_log_level="error"
        )
        self._writers[episode] = writer
        with warnings.catch_warnings():
            # The first frame starts ffmpeg with fork+exec, which JAX's at-fork hook warns about
            # (exec follows at once: nothing of the multithreaded parent runs in the child).
            warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
            writer.append_data(image)

    def finish(self, episode: int) -> None:
        """Close `episode`'s video; WriteFailed when it is incomplete (imageio does not check how
        ffmpeg ended: an MP4 that ffmpeg could not finish lacks its index or is cut short)."""
        writer = self._writers.pop(episode, None)
        if writer is not None:
            path = self.path(episode)
            with writing(path):
                writer.close()
            if not mp4_complete(path):
                raise WriteFailed(path, "ffmpeg could not finish the video")
            self.written[episode] = path

    def discard(self, episode: int) -> None:
        """Close `episode`'s unfinished video, if it has one: its next frame starts the file again."""
        writer = self._writers.pop(episode, None)
        if writer is not None:
            with contextlib.suppress(Exception):  # after a failed write: reported already
                writer.close()

    def close(self) -> None:
        """Close unfinished videos (after an error or interrupt); they stay on disk, truncated."""
        for episode in list(self._writers):
            self.discard(episode)


def mp4_complete(path: Path) -> bool:
    """Whether the MP4 file's top-level boxes fill it exactly and include its index (`moov`)."""
    try:
        with open(path, "rb") as f:
            size, offset, kinds = os.fstat(f.fileno()).st_size, 0, set()
            while offset < size:
                f.seek(offset)
                header = f.read(16)
                if len(header) < 8:
                    return False
                length, kind = struct.unpack(">I4s", header[:8])
                if length == 1 and len(header) == 16:
                    length = struct.unpack(">Q", header[8:])[0]
                elif length == 0:
                    length = size - offset
                if length < 8:
                    return False
                kinds.add(kind)
                offset += length
    except OSError:
        return False
    return offset == size and b"moov" in kinds
