from soundlake.cli import main

main()
