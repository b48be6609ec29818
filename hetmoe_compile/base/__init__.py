"""Stage base: what every stage may use and that imports no torch: errors, atomic file output, the version and
producer string, device kinds, text tables, the JSON schemas, host-memory control, the noise presets' summaries."""
