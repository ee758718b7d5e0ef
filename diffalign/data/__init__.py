"""Preference data: records, readers for hub / parquet / local jsonl sources (one ``FORMATS`` entry per
``data.format``), skip reporting, and adapting records to the data kind an objective needs."""

from diffalign.data.formats import FORMATS
from diffalign.data.kinds import DATA_KINDS, adapt_records
from diffalign.data.readers import open_rows, read_preferences
from diffalign.data.records import ImageSource, PreferenceRecord, SkipReport, open_image
from diffalign.errors import DataError

__all__ = ["DATA_KINDS", "FORMATS", "DataError", "ImageSource", "PreferenceRecord", "SkipReport", "adapt_records",
           "open_image", "open_rows", "read_preferences"]
