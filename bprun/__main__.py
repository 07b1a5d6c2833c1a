from bprun.cli import main

main()
