//! A Matrix `/sync` answer read as the adapter reads it: the batch with its timeline
//! events raw, then each event on its own; one event that cannot be read never fails
//! the batch or the events after it, and the id given for it is a string it carried
//! (an `event_id` read leniently, escapes decoded).
#![no_main]

use clawbus_channels::matrix::api::{read_event, SyncBatch};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|raw: &[u8]| {
    let Ok(batch) = serde_json::from_slice::<SyncBatch>(raw) else {
        return;
    };
    for room in batch.rooms.join.values() {
        for ev in &room.timeline.events {
            match read_event(ev) {
                Ok(_) => {}
                Err((Some(id), _)) => {
                    let id = serde_json::to_string(&id).expect("a string encodes");
                    let plain = ev.get().contains(&id[1..id.len() - 1]);
                    assert!(plain || ev.get().contains('\\'), "{id} not in {}", ev.get());
                }
                Err((None, _)) => {}
            }
        }
    }
});
