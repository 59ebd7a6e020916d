from replication.run import main

main()
