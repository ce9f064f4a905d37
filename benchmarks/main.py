"""The main job on the embedded default (``make demo``).

For now it loads MovieLens-100k from the installed ``recbole`` package and prints its summary;
the agent comparison replaces it once the environment and agents exist.
"""

from deeprec_env.data import load_dataset


def main() -> None:
    print(load_dataset("ml-100k").summary())


if __name__ == "__main__":
    main()
