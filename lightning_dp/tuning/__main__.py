"""``python -m lightning_dp.tuning``: the batch-size advisor's command line (see :mod:`lightning_dp.tuning.advisor`)."""

from lightning_dp.tuning.advisor import main

if __name__ == "__main__":
    main()
