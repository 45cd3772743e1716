"""The `drp` command line. PROVISIONAL: subcommands arrive with the training layer."""
import argparse


def build_parser():
    p = argparse.ArgumentParser(prog="drp", description="Deep Repulsive Prototypes: train and evaluate robust models")
    p.add_subparsers(dest="command")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help()
    return 0
