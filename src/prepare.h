// prepare.h: `simplest-dist prepare SRC DST (--short-side N | --max-side N) [--quality Q]`: a pre-resized copy of an
// ImageFolder tree (spec/data.md §4), FFCV-style. Same relative paths (so the same classes, labels and order);
// images re-encoded as baseline 4:2:0 RGB JPEG at quality Q, never upscaled; files that cannot be decoded and
// non-image files are copied verbatim. Writes are atomic and existing outputs are kept, so a rerun resumes.
#pragma once

// Returns the exit code (0, or 2 for a user error).
int prepare_main(int argc, char **argv);
