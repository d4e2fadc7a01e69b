"""The two retrieval directions as data: every key and message word that differs between them lives here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Direction:
    name: str  # "text_to_image" | "image_to_text"
    query_key: str  # id key of a query line: "text_id"
    target_key: str  # list key of a prediction / ground-truth line: "image_ids"
    gallery_key: str  # id key of a gallery feature line: "image_id"
    query_noun: str  # "texts"
    gallery_noun: str  # "images"

    @property
    def query_label(self) -> str:
        """``Text_id``: how the reference's messages start a sentence with the query key."""
        return self.query_key.capitalize()


TEXT_TO_IMAGE = Direction("text_to_image", "text_id", "image_ids", "image_id", "texts", "images")
IMAGE_TO_TEXT = Direction("image_to_text", "image_id", "text_ids", "text_id", "images", "texts")
DIRECTIONS = {d.name: d for d in (TEXT_TO_IMAGE, IMAGE_TO_TEXT)}


def get_direction(direction: str | Direction) -> Direction:
    if isinstance(direction, Direction):
        return direction
    try:
        return DIRECTIONS[direction]
    except KeyError:
        raise ValueError(f"unknown direction {direction!r}; choose from {', '.join(DIRECTIONS)}") from None
