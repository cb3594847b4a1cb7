from stream_agg.cli import main

main()
