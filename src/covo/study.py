from covo.analysis.study import main

if __name__ == "__main__":
    main()
