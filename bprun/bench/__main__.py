from bprun.bench.loop import main

main()
