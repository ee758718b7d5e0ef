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
    adapter = KindAdapter(data_kind, source)
    for record in records:
        adapter.observe(record)
    adapter.check_shapes()
    adapted = [new for record in records for new in adapter.adapt(record)]
    adapter.finish(len(records), len(adapted))
    return adapted


class KindAdapter:
    """``adapt_records`` one record at a time, for data too large to hold: ``observe`` every record (its shape),
    ``check_shapes``, ``adapt`` each, then ``finish`` (the checks and messages that need every record).

    ``adapt`` is a pure function of the record, so worker processes may run it on their own instance."""

    def __init__(self, data_kind: str, source: str):
        if data_kind not in DATA_KINDS:
            raise ConfigError(f"unknown data kind {data_kind!r}; expected one of {', '.join(DATA_KINDS)}")
        self.data_kind, self.where = data_kind, f"data.source={source}"
        self.shapes: Counter = Counter()
        self.stats: Counter = Counter()  # equal, converted, ties, unscored, unscored_ranked
        self.sizes: Counter = Counter()  # image counts of ranked output

    def observe(self, record: PreferenceRecord) -> None:
        self.shapes[record_shape(record)] += 1

    def accepts(self, record: PreferenceRecord) -> bool:
        """Whether ``check_shapes`` lets a record of this shape through (adapting it is then meaningful)."""
        refused = {"pair": "labelled", "scored_pair": "labelled", "labelled": "ranked", "ranked": "labelled"}
        return refused.get(self.data_kind) != record_shape(record)

    def check_shapes(self) -> None:
        """The errors that the mix of record shapes alone decides (labelled singles for a pairwise objective...)."""
        shapes, where = self.shapes, self.where
        if self.data_kind in ("pair", "scored_pair") and shapes["labelled"]:
            scored = " with scores" if self.data_kind == "scored_pair" else ""
            raise DataError(
                f"{where}: this objective is pairwise (data kind {self.data_kind!r}): it compares a preferred and a "
                f"rejected image of the same prompt, but the data holds {shapes['labelled']} labelled single images, "
                f"which cannot be paired. Provide pairs{scored} ({PAIR_FIELDS}), or ranked sets ({RANKED_FIELDS}), "
                f"or pick an objective with data kind 'labelled' (such as kto)."
            )
        if self.data_kind == "labelled" and shapes["ranked"]:
            raise DataError(
                f"{where}: this objective needs labelled single images (data kind 'labelled'), but the data holds "
                f"{shapes['ranked']} ranked sets, which carry scores, not desirable/undesirable labels. Provide "
                f"labelled images ({LABELLED_FIELDS}), or pairs ({PAIR_FIELDS}), which become a desirable winner and "
                f"an undesirable loser."
            )
        if self.data_kind == "ranked" and shapes["labelled"]:
            raise DataError(
                f"{where}: this objective ranks several images of one prompt by score (data kind 'ranked'), but the "
                f"data holds {shapes['labelled']} labelled single images. Provide ranked sets with scores "
                f"({RANKED_FIELDS}) or pairs with {PAIR_SCORE_FIELDS}."
            )

    def adapt(self, record: PreferenceRecord) -> list[PreferenceRecord]:
        """The records ``record`` becomes for this data kind (none, one, or one per image)."""
        kind, shape = self.data_kind, record_shape(record)
        if kind in ("pair", "scored_pair"):
            adapted = self.to_pair(record, shape)
            if kind == "scored_pair":
                self.stats["unscored"] += sum(1 for new in adapted if new.scores is None or len(new.scores) != 2)
            return adapted
        if kind == "labelled":
            return self.to_labelled(record, shape)
        if kind == "images":
            return [PreferenceRecord(index=record.index, prompt=record.prompt, images=[image])
                    for image in record.images]
        if record.scores is None or len(record.scores) != len(record.images):
            self.stats["unscored_ranked"] += 1
        self.sizes[len(record.images)] += 1
        return [record]

    def to_pair(self, record: PreferenceRecord, shape: str) -> list[PreferenceRecord]:
        if shape == "pair":
            if record.tie and record.scores and record.scores[0] == record.scores[1]:
                self.stats["equal"] += 1  # a ranking of two with equal scores: no best and worst
                return []
            return [record]
        scores = record.scores or []
        if len(scores) != len(record.images):
            raise DataError(f"{self.where}: record {record.index} is a set of {len(record.images)} images without "
                            f"one score per image, so it has no best and worst; add scores ({RANKED_FIELDS})")
        best = max(range(len(scores)), key=scores.__getitem__)
        worst = min(range(len(scores)), key=scores.__getitem__)
        if scores[best] == scores[worst]:
            self.stats["equal"] += 1
            return []
        self.stats["converted"] += 1
        return [PreferenceRecord(index=record.index, prompt=record.prompt,
                                 images=[record.images[best], record.images[worst]],
                                 scores=[scores[best], scores[worst]])]

    def to_labelled(self, record: PreferenceRecord, shape: str) -> list[PreferenceRecord]:
        if shape == "labelled":
            if not record.labels:
                raise DataError(f"{self.where}: record {record.index} is a single image without a label; add a "
                                f"label (1 = desirable, 0 = undesirable): {LABELLED_FIELDS}")
            return [record]
        if record.tie:
            self.stats["ties"] += 1
            return []
        return [PreferenceRecord(index=record.index, prompt=record.prompt, images=[image], labels=[label])
                for image, label in zip(record.images, (1.0, 0.0))]

    def finish(self, count_in: int, count_out: int) -> None:
        """The messages and the checks that need every record: unscored pairs or rankings, mixed K, nothing left."""
        kind, where, shapes, stats = self.data_kind, self.where, self.shapes, self.stats
        if kind in ("pair", "scored_pair") and (stats["converted"] or stats["equal"]):
            logger.info(f"data: {where}: turned {stats['converted']} ranked sets into best-vs-worst pairs; dropped "
                        f"{stats['equal']} whose best and worst scores are equal")
        if kind == "scored_pair" and stats["unscored"]:
            raise DataError(
                f"{where}: this objective (data kind 'scored_pair') weighs each pair by the scores of its two "
                f"images, but {stats['unscored']} of {count_out} pairs have no scores. Add {PAIR_SCORE_FIELDS}; or "
                f"provide ranked sets with scores ({RANKED_FIELDS}), which become best-vs-worst pairs."
            )
        if kind == "labelled" and shapes["pair"]:
            logger.info(f"data: {where}: split {shapes['pair'] - stats['ties']} pairs into a desirable winner and an "
                        f"undesirable loser; dropped {stats['ties']} kept ties, which carry no label")
        if kind == "images" and (shapes["pair"] or shapes["ranked"]):
            logger.info(f"data: {where}: split {shapes['pair']} pairs and {shapes['ranked']} ranked sets into single "
                        f"images (labels and scores are not used): {count_out} image-caption records")
        if kind == "ranked":
            self.check_ranked(count_in)
        if count_in and not count_out:
            raise DataError(f"{where}: no records are left for data kind {kind!r} after adapting "
                            f"{count_in} records ({shape_counts(shapes)}); see the messages above")

    def check_ranked(self, count: int) -> None:
        if self.stats["unscored_ranked"]:
            raise DataError(
                f"{self.where}: this objective ranks images by their scores (data kind 'ranked'), but "
                f"{self.stats['unscored_ranked']} of {count} records have no scores. Add scores: ranked sets "
                f"({RANKED_FIELDS}), or {PAIR_SCORE_FIELDS}."
            )
        if len(self.sizes) > 1:
            found = ", ".join(f"K={k}: {n} records" for k, n in sorted(self.sizes.items()))
            common = self.sizes.most_common(1)[0][0]
            raise DataError(
                f"{self.where}: ranked records must have equal image counts, one K for all (images are batched per "
                f"record), but found {found}. Filter the data so every record has the same number of images and "
                f"scores (for example keep only the K={common} sets)."
            )


def shape_counts(shapes: Counter) -> str:
    """"2 labelled, 5 pair": how many records of each shape."""
    return ", ".join(f"{count} {shape}" for shape, count in sorted(shapes.items()) if count)
