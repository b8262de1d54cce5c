"""A long plain-English text for the KV cache perplexity runs (bench/kv_cache.py --text): the
licence texts Debian ships in /usr/share/common-licenses, concatenated in a fixed order, one blank
line between them. GPL-3 alone gives 7,000+ tokens with Gemma's tokenizer (2-3 chunks of 2,048);
these four give about 16,000, enough for 6 chunks of 2,048 (24 of 512). The text is made on the
machine that runs the benchmark, not kept in the repository.

    python bench/licence_text.py OUT.txt
"""
from __future__ import annotations

import sys
from pathlib import Path

LICENCES = Path("/usr/share/common-licenses")
FILES = ("GPL-3", "GPL-2", "Apache-2.0", "MPL-2.0")


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    parts = [(LICENCES / name).read_text().strip() for name in FILES]
    Path(sys.argv[1]).write_text("\n\n".join(parts) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
