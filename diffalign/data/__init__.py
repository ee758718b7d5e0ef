"""Preference data: records, readers for hub / parquet / local jsonl sources, and skip reporting."""

from diffalign.data.readers import read_preferences
from diffalign.data.records import DataError, ImageSource, PreferenceRecord, SkipReport, open_image

__all__ = ["DataError", "ImageSource", "PreferenceRecord", "SkipReport", "open_image", "read_preferences"]
