"""Adapt read records to the data an objective declares (``Objective.data_kind``), before training starts.

    >>> from diffalign.data.records import PreferenceRecord
    >>> pair = PreferenceRecord(index=0, prompt="a red square", images=["red.png", "blue.png"])
    >>> [(r.images, r.labels) for r in adapt_records([pair], "labelled", "my_pairs")]   # KTO's data kind
    data: data.source=my_pairs: split 1 pairs into a desirable winner and an undesirable loser; dropped 0 kept ties, which carry no label
    [(['red.png'], [1.0]), (['blue.png'], [0.0])]

A record's shape says what it is: one image with ``labels`` is a labelled single, two images a pair (winner first,
``scores`` optional), three or more a ranked set. (A ranking of two is read winner first, so it is a scored pair.)

- ``pair``: pairs pass through; ranked sets become best-vs-worst pairs (sets whose scores are all equal are
  dropped); labelled singles are an error.
- ``scored_pair``: as ``pair``, and every pair must carry two scores.
- ``labelled``: singles pass through; a pair becomes winner (label 1) and loser (label 0); kept ties are dropped;
  ranked sets are an error.
- ``ranked``: ranked sets pass through and scored pairs are rankings of two; pairs without scores are an error,
  and every record must have the same number of images.
- ``images``: only images and captions are needed (Self-NPO): every image of every record becomes a single-image
  record (prompt, image) with labels and scores dropped; pairs and ranked sets give one record per image, kept ties
  included. Caption-only data (jsonl lines with ``prompt`` and ``file_name``) passes through.

Data that cannot give what the objective needs raises ``DataError`` naming the source and what to add.
"""

from __future__ import annotations

from collections import Counter

from diffalign.data.records import PreferenceRecord
from diffalign.errors import ConfigError, DataError
from diffalign.logs import get_logger

logger = get_logger(__name__)

DATA_KINDS = ("pair", "scored_pair", "labelled", "ranked", "images")

PAIR_FIELDS = ("jsonl lines with prompt, chosen_file_name, rejected_file_name; table columns chosen, rejected, "
               "prompt; or Pick-a-Pic columns caption, jpg_0, jpg_1, label_0")
PAIR_SCORE_FIELDS = ("scores for both images of each pair: jsonl keys chosen_score and rejected_score, or table "
                     "columns chosen_score and rejected_score (next to chosen, rejected, prompt)")
RANKED_FIELDS = "jsonl lines with prompt, file_names, scores; table columns images, scores, prompt"
LABELLED_FIELDS = "jsonl lines with prompt, file_name, label (0 or 1); table columns image, label, prompt"


def record_shape(record: PreferenceRecord) -> str:
    """labelled (one image), pair (two) or ranked (three or more)."""
    count = len(record.images)
    return "labelled" if count == 1 else "pair" if count == 2 else "ranked"


def adapt_records(records: list[PreferenceRecord], data_kind: str, source: str) -> list[PreferenceRecord]:
    """The records as ``data_kind`` needs them (see the module docstring).

    Args:
        records: as ``read_preferences`` returns them.
        data_kind: the objective's ``data_kind``: pair | scored_pair | labelled | ranked | images.
        source: ``data.source``, for messages.

    Returns:
        New records of the shape ``data_kind`` needs (pairs winner first, single images, rankings of one K).

    Raises:
        DataError: the data cannot give what ``data_kind`` needs (the message says what to add).
        ConfigError: an unknown ``data_kind``.
    """
    if data_kind not in DATA_KINDS:
        raise ConfigError(f"unknown data kind {data_kind!r}; expected one of {', '.join(DATA_KINDS)}")
    shapes = Counter(record_shape(record) for record in records)
    where = f"data.source={source}"
    if data_kind in ("pair", "scored_pair"):
        adapted = to_pairs(records, shapes, data_kind, where)
    elif data_kind == "labelled":
        adapted = to_labelled(records, shapes, where)
    elif data_kind == "images":
        adapted = to_images(records, shapes, where)
    else:
        adapted = to_ranked(records, shapes, where)
    if records and not adapted:
        raise DataError(f"{where}: no records are left for data kind {data_kind!r} after adapting "
                        f"{len(records)} records ({shape_counts(shapes)}); see the messages above")
    return adapted


def to_pairs(records: list[PreferenceRecord], shapes: Counter, data_kind: str, where: str) -> list[PreferenceRecord]:
    if shapes["labelled"]:
        scored = " with scores" if data_kind == "scored_pair" else ""
        raise DataError(
            f"{where}: this objective is pairwise (data kind {data_kind!r}): it compares a preferred and a rejected "
            f"image of the same prompt, but the data holds {shapes['labelled']} labelled single images, which "
            f"cannot be paired. Provide pairs{scored} ({PAIR_FIELDS}), or ranked sets ({RANKED_FIELDS}), or "
            f"pick an objective with data kind 'labelled' (such as kto)."
        )
    adapted, equal, converted = [], 0, 0
    for record in records:
        if record_shape(record) == "pair":
            if record.tie and record.scores and record.scores[0] == record.scores[1]:
                equal += 1  # a ranking of two with equal scores: no best and worst
            else:
                adapted.append(record)
            continue
        scores = record.scores or []
        if len(scores) != len(record.images):
            raise DataError(f"{where}: record {record.index} is a set of {len(record.images)} images without one "
                            f"score per image, so it has no best and worst; add scores ({RANKED_FIELDS})")
        best = max(range(len(scores)), key=scores.__getitem__)
        worst = min(range(len(scores)), key=scores.__getitem__)
        if scores[best] == scores[worst]:
            equal += 1
            continue
        converted += 1
        adapted.append(PreferenceRecord(index=record.index, prompt=record.prompt,
                                        images=[record.images[best], record.images[worst]],
                                        scores=[scores[best], scores[worst]]))
    if converted or equal:
        logger.info(f"data: {where}: turned {converted} ranked sets into best-vs-worst pairs; dropped {equal} whose "
                    f"best and worst scores are equal")
    if data_kind == "scored_pair":
        unscored = sum(1 for record in adapted if record.scores is None or len(record.scores) != 2)
        if unscored:
            raise DataError(
                f"{where}: this objective (data kind 'scored_pair') weighs each pair by the scores of its two "
                f"images, but {unscored} of {len(adapted)} pairs have no scores. Add {PAIR_SCORE_FIELDS}; or "
                f"provide ranked sets with scores ({RANKED_FIELDS}), which become best-vs-worst pairs."
            )
    return adapted


def to_labelled(records: list[PreferenceRecord], shapes: Counter, where: str) -> list[PreferenceRecord]:
    if shapes["ranked"]:
        raise DataError(
            f"{where}: this objective needs labelled single images (data kind 'labelled'), but the data holds "
            f"{shapes['ranked']} ranked sets, which carry scores, not desirable/undesirable labels. Provide labelled "
            f"images ({LABELLED_FIELDS}), or pairs ({PAIR_FIELDS}), which become a desirable winner and an "
            f"undesirable loser."
        )
    adapted, ties = [], 0
    for record in records:
        if record_shape(record) == "labelled":
            if not record.labels:
                raise DataError(f"{where}: record {record.index} is a single image without a label; add a label "
                                f"(1 = desirable, 0 = undesirable): {LABELLED_FIELDS}")
            adapted.append(record)
        elif record.tie:
            ties += 1
        else:
            adapted.extend(PreferenceRecord(index=record.index, prompt=record.prompt, images=[image], labels=[label])
                           for image, label in zip(record.images, (1.0, 0.0)))
    if shapes["pair"]:
        logger.info(f"data: {where}: split {shapes['pair'] - ties} pairs into a desirable winner and an undesirable "
                    f"loser; dropped {ties} kept ties, which carry no label")
    return adapted


def to_images(records: list[PreferenceRecord], shapes: Counter, where: str) -> list[PreferenceRecord]:
    adapted = [PreferenceRecord(index=record.index, prompt=record.prompt, images=[image])
               for record in records for image in record.images]
    if shapes["pair"] or shapes["ranked"]:
        logger.info(f"data: {where}: split {shapes['pair']} pairs and {shapes['ranked']} ranked sets into single "
                    f"images (labels and scores are not used): {len(adapted)} image-caption records")
    return adapted


def to_ranked(records: list[PreferenceRecord], shapes: Counter, where: str) -> list[PreferenceRecord]:
    if shapes["labelled"]:
        raise DataError(
            f"{where}: this objective ranks several images of one prompt by score (data kind 'ranked'), but the "
            f"data holds {shapes['labelled']} labelled single images. Provide ranked sets with scores "
            f"({RANKED_FIELDS}) or pairs with {PAIR_SCORE_FIELDS}."
        )
    unscored = sum(1 for record in records if record.scores is None or len(record.scores) != len(record.images))
    if unscored:
        raise DataError(
            f"{where}: this objective ranks images by their scores (data kind 'ranked'), but {unscored} of "
            f"{len(records)} records have no scores. Add scores: ranked sets ({RANKED_FIELDS}), or "
            f"{PAIR_SCORE_FIELDS}."
        )
    sizes = Counter(len(record.images) for record in records)
    if len(sizes) > 1:
        found = ", ".join(f"K={k}: {n} records" for k, n in sorted(sizes.items()))
        common = sizes.most_common(1)[0][0]
        raise DataError(
            f"{where}: ranked records must have equal image counts, one K for all (images are batched per record), "
            f"but found {found}. Filter the data so every record has the same number of images and scores "
            f"(for example keep only the K={common} sets)."
        )
    return list(records)


def shape_counts(shapes: Counter) -> str:
    """"2 labelled, 5 pair": how many records of each shape."""
    return ", ".join(f"{count} {shape}" for shape, count in sorted(shapes.items()) if count)
