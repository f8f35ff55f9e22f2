def main():  # replaced by the real command line
    raise SystemExit("not implemented yet")


if __name__ == "__main__":
    main()
