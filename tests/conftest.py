import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests/models.py builds the small test graphs
