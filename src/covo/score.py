from covo.analysis.score import main

if __name__ == "__main__":
    main()
