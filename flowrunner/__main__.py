from flowrunner.cli import main

main()
