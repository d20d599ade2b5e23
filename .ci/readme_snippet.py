"""Run the README's first Python block exactly as written."""

import re
import sys
from pathlib import Path

text = Path(sys.argv[1]).read_text(encoding="utf-8")
block = re.search(r"```python\n(.*?)```", text, re.S)
if block is None:
    sys.exit("no ```python block in the README")
exec(compile(block.group(1), "README.md", "exec"), {"__name__": "__main__"})
