import sys
from pathlib import Path

# support.py lives beside this file; tests import it as a plain module.
sys.path.insert(0, str(Path(__file__).parent))
