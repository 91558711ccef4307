-- Deletions noticed by reconciliation rather than reported by Discord.
--
-- While the worker is away (stopped, or reconnected without a resume), Discord
-- sends nothing about messages deleted meanwhile. After such a gap the worker
-- re-reads a recent window of each channel; a stored message that Discord no
-- longer returns from a contiguous range of its history was deleted at some
-- unknown time before this. `deleted_at` keeps its meaning (when Discord
-- reported the deletion live); `deletion_detected_at` is when the observer
-- noticed one it was never told about. A tombstone has one or the other.
alter table messages add column deletion_detected_at timestamptz;
