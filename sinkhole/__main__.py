from sinkhole.cli import main

main()
