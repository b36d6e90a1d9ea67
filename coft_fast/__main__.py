"""`python -m coft_fast ...` (and so `torchrun -m coft_fast ...`)."""
from coft_fast.cli import main

if __name__ == "__main__":
    main()
