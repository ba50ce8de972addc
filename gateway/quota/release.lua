-- Release one stream lease from every lease set it is in (gone already: nothing to do).
-- KEYS[1..] the lease sets of its levels   ARGV[1] lease id
for _, leases in ipairs(KEYS) do
  redis.call('ZREM', leases, ARGV[1])
end
return 1
