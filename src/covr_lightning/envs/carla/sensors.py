"""The ego car's sensors: the policy cameras (one panorama), the VLM's view camera, collisions.

Sensor data arrives on the client's threads; the queues here hand it to the env's tick. While the
env is parked (another env of the process ticks the shared world) the sensors are *muted*: their
callbacks drop what they see, and :meth:`EgoSensors.drain` empties what was queued before.
"""

from __future__ import annotations

import math
import queue

import numpy as np

from covr_lightning.envs.carla.scenarios import CAMERA_MOUNT
from covr_lightning.envs.carla.server import CarlaServer


def bgra_to_rgb(image) -> np.ndarray:
    """A ``carla.Image`` (BGRA bytes) -> (H, W, 3) uint8 RGB, copied out of the client's buffer."""
    bgra = np.frombuffer(image.raw_data, dtype=np.uint8).reshape(image.height, image.width, 4)
    return np.ascontiguousarray(bgra[:, :, 2::-1])


class EgoSensors:
    """Cameras and a collision sensor on the ego car, and what they reported.

    Args:
        timeout: Seconds to wait for a camera image.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.muted = False
        self._cameras: list[queue.SimpleQueue] = []
        self._view: queue.SimpleQueue | None = None
        self._collisions: queue.SimpleQueue = queue.SimpleQueue()

    def spawn(
        self, server: CarlaServer, ego, image_size: int, cameras: int, fov: float, view_size: int
    ) -> list:
        """Attach ``cameras`` policy cameras side by side (left to right), the view camera
        (``view_size`` > 0) and the collision sensor to ``ego``.

        Returns:
            The sensor actors.
        """
        carla = server.carla
        mount = carla.Location(x=CAMERA_MOUNT[0], z=CAMERA_MOUNT[1])
        actors: list = []
        self._cameras = []
        for k in range(cameras):
            yaw = (k - (cameras - 1) / 2) * fov  # left to right
            rotation = carla.Rotation(yaw=yaw)
            self._cameras.append(
                self._camera(server, ego, image_size, fov, carla.Transform(mount, rotation), actors)
            )
        self._view = None
        if view_size:
            self._view = self._camera(server, ego, view_size, fov, carla.Transform(mount), actors)
        collision = server.world.spawn_actor(
            server.blueprints.find("sensor.other.collision"), carla.Transform(), attach_to=ego
        )
        actors.append(collision)
        collision.listen(self._on_collision)
        return actors

    def _camera(self, server: CarlaServer, ego, size: int, fov: float, transform, actors: list):
        blueprint = server.blueprints.find("sensor.camera.rgb")
        blueprint.set_attribute("image_size_x", str(size))
        blueprint.set_attribute("image_size_y", str(size))
        blueprint.set_attribute("fov", str(fov))
        camera = server.world.spawn_actor(blueprint, transform, attach_to=ego)
        actors.append(camera)
        images: queue.SimpleQueue = queue.SimpleQueue()
        camera.listen(lambda image: None if self.muted else images.put(image))
        return images

    def observe(self, frame: int) -> tuple[np.ndarray, np.ndarray]:
        """Wait for every camera's image of ``frame``.

        Returns:
            The policy frame ``(3, H, cameras * W)`` uint8 (the cameras stitched left to right)
            and the view ``(h, w, 3)`` uint8 (the centre policy camera's without a view camera).

        Raises:
            RuntimeError: A camera sent no image within the timeout.
        """
        images = [bgra_to_rgb(self._image(q, frame)) for q in self._cameras]
        panorama = np.concatenate(images, axis=1) if len(images) > 1 else images[0]
        policy = np.ascontiguousarray(panorama.transpose(2, 0, 1))
        if self._view is not None:
            return policy, bgra_to_rgb(self._image(self._view, frame))
        return policy, images[len(images) // 2]

    def _image(self, images: queue.SimpleQueue, frame: int):
        """The image of ``frame`` from a camera's queue (older ones are dropped)."""
        while True:
            try:
                image = images.get(timeout=self.timeout)
            except queue.Empty:
                raise RuntimeError(
                    f"no camera image for frame {frame} within {self.timeout:g} s"
                ) from None
            if image.frame >= frame:
                return image

    def _on_collision(self, event) -> None:
        """Collision sensor callback (client thread): queue the impulse norm and who was hit."""
        if self.muted:
            return
        impulse = event.normal_impulse
        other = getattr(event.other_actor, "type_id", "") or ""
        self._collisions.put((math.sqrt(impulse.x**2 + impulse.y**2 + impulse.z**2), other))

    def take_collisions(self) -> tuple[float, bool]:
        """Sum of the impulses queued since the last call, and whether one was with a walker."""
        total, pedestrian = 0.0, False
        while not self._collisions.empty():
            impulse, other = self._collisions.get_nowait()
            total += impulse
            pedestrian |= other.startswith("walker.")
        return total, pedestrian

    def drain(self) -> None:
        """Drop every queued image and collision (what arrived while parked or before a loss)."""
        for images in [*self._cameras, self._view]:
            while images is not None and not images.empty():
                images.get_nowait()
        while not self._collisions.empty():
            self._collisions.get_nowait()
