"""Preference data: records, readers for hub / parquet / local jsonl sources, skip reporting, and adapting
records to the data kind an objective needs."""

from diffalign.data.kinds import DATA_KINDS, adapt_records
from diffalign.data.readers import read_preferences
from diffalign.data.records import DataError, ImageSource, PreferenceRecord, SkipReport, open_image

__all__ = ["DATA_KINDS", "DataError", "ImageSource", "PreferenceRecord", "SkipReport", "adapt_records", "open_image",
           "read_preferences"]
