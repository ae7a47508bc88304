"""Where samples come from: in-memory arrays, the built-in digits, Parquet image datasets and the converter."""
