"""`python -m albor ...` runs the CLI (also the entry point under `torchrun -m albor`)."""

from albor.cli import main

if __name__ == "__main__":
    main()
