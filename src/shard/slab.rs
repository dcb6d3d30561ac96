//! A generational slab for connections.
//!
//! Connections are named by [`ConnId`] (index + generation) in channel
//! subscriber lists and in mail between shards; the generation makes an id
//! that outlived its connection miss instead of reaching the next connection
//! that got the same slot.

/// Defined in the bottom layer so that users and mail can name connections
/// without depending on the shard.
pub use crate::domain::ConnId;

/// Slots with generations and a free list.
#[derive(Debug)]
pub struct Slab<T> {
    slots: Vec<(u32, Option<T>)>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab { slots: Vec::new(), free: Vec::new(), len: 0 }
    }
}

impl<T> Slab<T> {
    pub fn insert(&mut self, value: T) -> ConnId {
        self.len += 1;
        if let Some(index) = self.free.pop() {
            let slot = &mut self.slots[index as usize];
            slot.0 = slot.0.wrapping_add(1);
            slot.1 = Some(value);
            ConnId { index, generation: slot.0 }
        } else {
            self.slots.push((0, Some(value)));
            ConnId { index: (self.slots.len() - 1) as u32, generation: 0 }
        }
    }

    pub fn get(&self, id: ConnId) -> Option<&T> {
        match self.slots.get(id.index as usize) {
            Some((g, Some(v))) if *g == id.generation => Some(v),
            _ => None,
        }
    }

    pub fn get_mut(&mut self, id: ConnId) -> Option<&mut T> {
        match self.slots.get_mut(id.index as usize) {
            Some((g, Some(v))) if *g == id.generation => Some(v),
            _ => None,
        }
    }

    pub fn remove(&mut self, id: ConnId) -> Option<T> {
        match self.slots.get_mut(id.index as usize) {
            Some((g, slot @ Some(_))) if *g == id.generation => {
                self.free.push(id.index);
                self.len -= 1;
                slot.take()
            }
            _ => None,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Ids of every live entry (a snapshot, so the slab may change meanwhile).
    pub fn ids(&self) -> Vec<ConnId> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, (_, v))| v.is_some())
            .map(|(i, (g, _))| ConnId { index: i as u32, generation: *g })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_ids_miss_after_slot_reuse() {
        let mut s = Slab::default();
        let a = s.insert("a");
        assert_eq!(s.remove(a), Some("a"));
        let b = s.insert("b");
        assert_eq!(a.index, b.index);
        assert_eq!(s.get(a), None);
        assert_eq!(s.get(b), Some(&"b"));
        assert_eq!(s.remove(a), None);
        assert_eq!(s.len(), 1);
    }
}
